/** ALiBi slopes of flash_attn / the ALiBi paper for any number of heads. */

function powerOfTwoSlopes(n: number): number[] {
  const start = Math.pow(2, -Math.pow(2, -(Math.log2(n) - 3)));
  return Array.from({length: n}, (_, i) => start * Math.pow(start, i));
}

/**
 * One slope per head: a geometric sequence for powers of 2; otherwise that
 * of the largest power of 2 below, completed by every other slope of twice it.
 */
export function alibiSlopes(numHeads: number): number[] {
  const closest = Math.pow(2, Math.floor(Math.log2(numHeads)));
  if (closest === numHeads) {
    return powerOfTwoSlopes(numHeads);
  }
  const extra = alibiSlopes(2 * closest).filter((_, i) => i % 2 === 0);
  return powerOfTwoSlopes(closest).concat(extra.slice(0, numHeads - closest));
}
