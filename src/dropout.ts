/**
 * The dropout mask, defined once for every backend.
 *
 * Attention dropout draws one bit per (batch b, query head h, query row i,
 * key column j). To let the forward and backward passes (and the WGSL, CUDA
 * and reference implementations) regenerate exactly the same mask without
 * storing it, the bits come from the counter-based generator
 * Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
 * 1, 2, 3", SC'11):
 *
 *   key     = (seedLo, seedHi)              the seed's low and high 32 bits
 *   counter = (j >>> 2, i, h, b)            one call serves 4 adjacent keys
 *   word    = philox4x32_10(counter, key)[j & 3]
 *   keep    = word >= threshold,  threshold = min(floor(rate * 2^32), 2^32 - 1)
 *
 * A kept weight is scaled by `1 / (1 - rate)`; a dropped one is 0. The
 * log-sum-exp output is computed before dropout (as in flash_attn).
 *
 * Philox round (all arithmetic mod 2^32; mulhilo = high and low halves of
 * the 64-bit product):
 *   (hi0, lo0) = mulhilo(0xD2511F53, c0);  (hi1, lo1) = mulhilo(0xCD9E8D57, c2)
 *   c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
 *   k = (k0 + 0x9E3779B9, k1 + 0xBB67AE85)       (between rounds)
 * Ten rounds. Known answers (Random123's kat_vectors) are in the tests.
 */

const PHILOX_M0 = 0xD2511F53;
const PHILOX_M1 = 0xCD9E8D57;
const PHILOX_W0 = 0x9E3779B9;
const PHILOX_W1 = 0xBB67AE85;
const TWO_POW_32 = 4294967296;

/** High 32 bits of the unsigned 64-bit product a * b (both uint32). */
function mulHi32(a: number, b: number): number {
  // Split into 16-bit halves so every partial product is exact in a double.
  const aLo = a & 0xffff, aHi = a >>> 16;
  const bLo = b & 0xffff, bHi = b >>> 16;
  const lolo = aLo * bLo;
  const mid1 = aHi * bLo;
  const mid2 = aLo * bHi;
  const carry = ((lolo >>> 16) + (mid1 & 0xffff) + (mid2 & 0xffff)) >>> 16;
  return (aHi * bHi + (mid1 >>> 16) + (mid2 >>> 16) + carry) >>> 0;
}

/**
 * Philox4x32-10 of one counter under one key; writes 4 uint32 words into
 * `out` (a reused buffer, to keep the mask loop allocation-free).
 */
export function philox4x32(
    c0: number, c1: number, c2: number, c3: number, k0: number, k1: number,
    out: Uint32Array): Uint32Array {
  for (let round = 0; round < 10; round++) {
    const hi0 = mulHi32(PHILOX_M0, c0);
    const lo0 = Math.imul(PHILOX_M0, c0) >>> 0;
    const hi1 = mulHi32(PHILOX_M1, c2);
    const lo1 = Math.imul(PHILOX_M1, c2) >>> 0;
    c0 = (hi1 ^ c1 ^ k0) >>> 0;
    c1 = lo1;
    c2 = (hi0 ^ c3 ^ k1) >>> 0;
    c3 = lo0;
    k0 = (k0 + PHILOX_W0) >>> 0;
    k1 = (k1 + PHILOX_W1) >>> 0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
  return out;
}

/** The uint32 a Philox word must reach for its weight to be kept. */
export function dropoutThreshold(rate: number): number {
  return Math.min(Math.floor(rate * TWO_POW_32), TWO_POW_32 - 1);
}

/** Splits a seed (integer in [0, 2^53)) into the two key words. */
export function splitSeed(seed: number): {seedLo: number, seedHi: number} {
  return {seedLo: seed % TWO_POW_32, seedHi: Math.floor(seed / TWO_POW_32)};
}

/** A fresh random seed, for dropout calls that give none. */
export function randomSeed(): number {
  return Math.floor(Math.random() * 2 ** 53);
}

/**
 * The scaled keep-mask of one (b, h) and a rectangle of rows and columns:
 * `mask[(i - row0) * numCols + (j - col0)]` is `1 / (1 - rate)` if kept,
 * else 0. Written into `target` at `offset`.
 */
export function fillDropoutMask(
    target: Float32Array, offset: number, seedLo: number, seedHi: number, rate: number, b: number,
    h: number, row0: number, numRows: number, col0: number, numCols: number): void {
  const threshold = dropoutThreshold(rate);
  const keepScale = 1 / (1 - rate);
  const words = new Uint32Array(4);
  const colEnd = col0 + numCols;
  for (let r = 0; r < numRows; r++) {
    const i = row0 + r;
    const rowBase = offset + r * numCols - col0;
    let quad = -1;
    for (let j = col0; j < colEnd; j++) {
      if ((j >>> 2) !== quad) {
        quad = j >>> 2;
        philox4x32(quad, i, h, b, seedLo, seedHi, words);
      }
      target[rowBase + j] = words[j & 3] >= threshold ? keepScale : 0;
    }
  }
}
