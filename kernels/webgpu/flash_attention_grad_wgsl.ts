/**
 * WGSL shared by the backward's programs: the uniform block, the dropout
 * generator (src/dropout.ts's Philox4x32-10, bit for bit) and the score
 * function with the derivative pieces the backward needs.
 */
import type {FlashAttentionAttrs} from '../../src/kernel_names';
import type {AttentionShapes} from '../../src/checks';
import {dropoutThreshold} from '../../src/dropout';

/** What is baked into a program (and so into its shader key). */
export interface GradFeatures {
  softcap: boolean;
  alibi: boolean;
  dropout: boolean;
}

export function gradFeatures(attrs: FlashAttentionAttrs, hasAlibi: boolean): GradFeatures {
  return {softcap: attrs.softcap > 0, alibi: hasAlibi, dropout: attrs.dropoutRate > 0};
}

export function featureKey(f: GradFeatures): string {
  return `${f.softcap ? 'C' : 'c'}${f.alibi ? 'A' : 'a'}${f.dropout ? 'P' : 'p'}`;
}

/** Uniform block; runtime values only, so shapes never recompile. */
export const PARAMS_WGSL = `
struct Params {
  batch: i32, seqQ: i32, seqK: i32, heads: i32,
  headsKV: i32, windowLeft: i32, windowRight: i32, alibiPerBatch: i32,
  seedLo: u32, seedHi: u32, threshold: u32, unused0: u32,
  scale: f32, softcap: f32, keepScale: f32, unused1: f32,
};
@group(0) @binding(0) var<uniform> p: Params;
`;

/** The uniform block's bytes for one call. */
export function gradUniforms(
    shapes: AttentionShapes, attrs: FlashAttentionAttrs,
    alibiShape: readonly number[]): ArrayBuffer {
  const buffer = new ArrayBuffer(64);
  const i32 = new Int32Array(buffer);
  const u32 = new Uint32Array(buffer);
  const f32 = new Float32Array(buffer);
  i32.set([
    shapes.batch, shapes.seqQ, shapes.seqK, shapes.heads, shapes.headsKV,
    attrs.windowLeft, attrs.windowRight, alibiShape.length === 2 ? 1 : 0,
  ]);
  u32[8] = attrs.seedLo >>> 0;
  u32[9] = attrs.seedHi >>> 0;
  u32[10] = attrs.dropoutRate > 0 ? dropoutThreshold(attrs.dropoutRate) : 0;
  f32[12] = attrs.softmaxScale;
  f32[13] = attrs.softcap;
  f32[14] = attrs.dropoutRate > 0 ? 1 / (1 - attrs.dropoutRate) : 1;
  return buffer;
}

/**
 * Philox4x32-10 with counter (c0, c1, c2, c3) and key (seedLo, seedHi).
 * WGSL has no 64-bit integers: the high half of a product is built from
 * 16-bit halves, as in src/dropout.ts.
 */
export const PHILOX_WGSL = `
fn gradMulHi(a: u32, b: u32) -> u32 {
  let aLo = a & 0xffffu; let aHi = a >> 16u;
  let bLo = b & 0xffffu; let bHi = b >> 16u;
  let lolo = aLo * bLo; let mid1 = aHi * bLo; let mid2 = aLo * bHi;
  let carry = ((lolo >> 16u) + (mid1 & 0xffffu) + (mid2 & 0xffffu)) >> 16u;
  return aHi * bHi + (mid1 >> 16u) + (mid2 >> 16u) + carry;
}
fn gradPhilox(counter: vec4<u32>) -> vec4<u32> {
  var c = counter;
  var k0 = p.seedLo; var k1 = p.seedHi;
  for (var round = 0; round < 10; round++) {
    let hi0 = gradMulHi(0xD2511F53u, c.x); let lo0 = 0xD2511F53u * c.x;
    let hi1 = gradMulHi(0xCD9E8D57u, c.z); let lo1 = 0xCD9E8D57u * c.z;
    c = vec4<u32>(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    k0 = k0 + 0x9E3779B9u; k1 = k1 + 0xBB67AE85u;
  }
  return c;
}
/** Scaled keep factors of keys j0..j0+3 (j0 % 4 == 0) of row i of (b, h). */
fn gradKeep4(b: i32, h: i32, i: i32, j0: i32) -> vec4<f32> {
  let w = gradPhilox(vec4<u32>(u32(j0) >> 2u, u32(i), u32(h), u32(b)));
  return select(vec4<f32>(0.0), vec4<f32>(p.keepScale), w >= vec4<u32>(p.threshold));
}
`;

/** Is key j visible to query i (window/causal; bounds checked apart)? */
export const VISIBLE_WGSL = `
fn gradVisible(i: i32, j: i32) -> bool {
  let d = j - (i + p.seqK - p.seqQ);
  return (p.windowLeft < 0 || d >= -p.windowLeft) &&
         (p.windowRight < 0 || d <= p.windowRight);
}
`;

/**
 * `gradScore(dot, i, j, b, h)` returns (final score, d score / d (scale *
 * dot)): scale, then softcap (derivative 1 - tanh^2), then ALiBi. tanh is
 * written out so that huge arguments give +-1, never NaN.
 */
export function scoreWGSL(f: GradFeatures): string {
  return `
fn gradTanh(x: f32) -> f32 {
  let e = exp(-2.0 * abs(x));
  return sign(x) * (1.0 - e) / (1.0 + e);
}
fn gradScore(dot: f32, i: i32, j: i32, b: i32, h: i32) -> vec2<f32> {
  var s = dot * p.scale;
  var ds = 1.0;
  ${f.softcap ? `
  let th = gradTanh(s / p.softcap);
  s = p.softcap * th;
  ds = 1.0 - th * th;` : ''}
  ${f.alibi ? `
  let slope = slopes[select(h, b * p.heads + h, p.alibiPerBatch != 0)];
  s = s - slope * f32(abs(i + p.seqK - p.seqQ - j));` : ''}
  return vec2<f32>(s, ds);
}
`;
}
