/**
 * A map of values made on first use, cleared when it reaches `capacity`
 * entries: the per-call caches of the WebGPU kernels (plans, tiles,
 * programs, uniform buffers) stay small however many shapes a process sees.
 */
export class BoundedCache<V> {
  private readonly entries = new Map<string, V>();

  constructor(private readonly capacity: number) {}

  /** The value under `key`, made by `make` (and kept) on a miss. */
  get(key: string, make: () => V): V {
    if (this.entries.has(key)) {
      return this.entries.get(key)!;
    }
    const value = make();
    if (this.entries.size >= this.capacity) {
      this.entries.clear();
    }
    this.entries.set(key, value);
    return value;
  }
}
