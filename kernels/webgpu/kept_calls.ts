/**
 * Planned kernel calls remembered per device (the forward's and the
 * backward's): the JavaScript of a short call is mostly planning it
 * (benchmarks/js_overhead.ts), and a call whose input shapes and attributes
 * repeat gets the same plan. Matched field by field, most recent first:
 * cheaper than building and hashing a string key on every call.
 */
import type * as tf from '@tensorflow/tfjs-core';

/**
 * A plan and what it was planned for: the dims of every planned input (-1
 * for an absent one) and every attribute, by name, in order.
 */
interface Kept<C> {
  dims: number[];
  attrNames: string[];
  attrValues: unknown[];
  call: C;
}

type Inputs = Readonly<Record<string, tf.TensorInfo|undefined>>;

export class KeptCalls<C> {
  private readonly byDevice = new WeakMap<GPUDevice, Array<Kept<C>>>();

  /**
   * `inputNames`: the inputs whose shapes the plan depends on; `capacity`:
   * distinct calls kept per device (the least recent go first).
   */
  constructor(private readonly inputNames: readonly string[], private readonly capacity: number) {}

  /** The plan kept for these inputs and attributes, or `plan()`'s, kept. */
  get(device: GPUDevice, inputs: Inputs, attrs: Readonly<Record<string, unknown>>,
      plan: () => C): C {
    let calls = this.byDevice.get(device);
    if (calls == null) {
      calls = [];
      this.byDevice.set(device, calls);
    }
    for (let i = 0; i < calls.length; i++) {
      const kept = calls[i];
      if (this.keptFor(kept, inputs, attrs)) {
        if (i > 0) {
          calls.splice(i, 1);
          calls.unshift(kept);
        }
        return kept.call;
      }
    }
    const call = plan();
    const attrNames = Object.keys(attrs);
    calls.unshift({
      dims: this.inputDims(inputs),
      attrNames,
      attrValues: attrNames.map(name => attrs[name]),
      call,
    });
    calls.length = Math.min(calls.length, this.capacity);
    return call;
  }

  private inputDims(inputs: Inputs): number[] {
    const dims: number[] = [];
    for (const name of this.inputNames) {
      const shape = inputs[name]?.shape;
      if (shape == null) {
        dims.push(-1);
      } else {
        dims.push(shape.length, ...shape);
      }
    }
    return dims;
  }

  private keptFor(kept: Kept<C>, inputs: Inputs, attrs: Readonly<Record<string, unknown>>):
      boolean {
    const dims = kept.dims;
    let at = 0;
    for (const name of this.inputNames) {
      const shape = inputs[name]?.shape;
      if (shape == null) {
        if (dims[at++] !== -1) {
          return false;
        }
        continue;
      }
      if (dims[at++] !== shape.length) {
        return false;
      }
      for (let i = 0; i < shape.length; i++) {
        if (dims[at++] !== shape[i]) {
          return false;
        }
      }
    }
    let n = 0;
    for (const name in attrs) {
      if (kept.attrNames[n] !== name || !Object.is(kept.attrValues[n], attrs[name])) {
        return false;
      }
      n++;
    }
    return n === kept.attrNames.length;
  }
}
