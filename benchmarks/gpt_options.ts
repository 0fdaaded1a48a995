/**
 * Command-line options shared by the GPT benchmarks (train_gpt.ts,
 * step_profile.ts): `--name=value` flags and the model's size.
 */

/** The value of `--name=value`, or `fallback`. */
export function option(name: string, fallback: string): string {
  const prefix = `--${name}=`;
  return process.argv.slice(2).find(a => a.startsWith(prefix))?.slice(prefix.length) ?? fallback;
}

/** Characters are bytes. */
export const VOCAB = 256;

/**
 * The benchmark GPT: 6 layers, 512 wide, 8 heads (smaller ones only to try
 * the scripts on a machine without a GPU: --layers, --width, --heads).
 */
export function gptSize(): {layers: number, width: number, heads: number} {
  return {
    layers: Number(option('layers', '6')),
    width: Number(option('width', '512')),
    heads: Number(option('heads', '8'))
  };
}
