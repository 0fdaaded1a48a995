/**
 * tfjs flags of the package. In Node each also reads the environment
 * variable of the same name; in a page, `?tfjsflags=NAME:value` works too.
 */
import * as tf from '@tensorflow/tfjs-core';

/** `auto` (fused kernel when the backend has one), `fused` or `reference`. */
export const FLASH_ATTENTION_IMPL = 'FLASH_ATTENTION_IMPL';
/** Most scores one block of the composed reference holds (memory bound). */
export const FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS = 'FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS';
/**
 * Opt-in for the WebGPU subgroup-matrix (tensor core) kernels on devices
 * that offer them (docs/tensor_cores.md). Off by default; on real
 * tensor-core hardware it has no effect until those kernels pass their
 * hardware check (they failed the first one).
 */
export const FLASH_ATTENTION_TENSOR_CORES = 'FLASH_ATTENTION_TENSOR_CORES';

export type FlashAttentionImpl = 'auto'|'fused'|'reference';
const IMPLS: readonly FlashAttentionImpl[] = ['auto', 'fused', 'reference'];
/**
 * 2^19 float32 scores = 2 MiB per block tensor. A masked block holds about
 * three such tensors at once (scores, the broadcast mask and fill of
 * tf.where, its result), so the peak stays well under a score tensor.
 */
const DEFAULT_BLOCK_ELEMENTS = 1 << 19;

function environmentVariable(name: string): string|undefined {
  // `process` is absent in browsers; bundlers may also stub it.
  const env = typeof process !== 'undefined' ? process.env : undefined;
  const value = env?.[name];
  return value === '' ? undefined : value;
}

tf.env().registerFlag(
    FLASH_ATTENTION_IMPL, () => environmentVariable(FLASH_ATTENTION_IMPL) ?? 'auto');
tf.env().registerFlag(
    FLASH_ATTENTION_TENSOR_CORES,
    () => environmentVariable(FLASH_ATTENTION_TENSOR_CORES) === 'true');
tf.env().registerFlag(FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS, () => {
  const value = environmentVariable(FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS);
  return value == null ? DEFAULT_BLOCK_ELEMENTS : Number(value);
});

/** The selected implementation, validated. */
export function getImpl(): FlashAttentionImpl {
  const value = tf.env().get(FLASH_ATTENTION_IMPL);
  if (!IMPLS.includes(value as FlashAttentionImpl)) {
    throw new Error(
        `${FLASH_ATTENTION_IMPL} must be one of ${IMPLS.join(', ')}, got ${JSON.stringify(value)}`);
  }
  return value as FlashAttentionImpl;
}

export function getReferenceBlockElements(): number {
  const value = Number(tf.env().get(FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS));
  if (!Number.isInteger(value) || value < 1) {
    throw new Error(`${FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS} must be a positive integer, got ${
        JSON.stringify(tf.env().get(FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS))}`);
  }
  return value;
}
