/**
 * flashAttentionWithKVCache: attention of a few new queries over a cache of
 * keys and values, appending the new keys and values to the cache in place
 * (flash_attn 2.x's flash_attn_with_kvcache). Inference only.
 *
 * The caches are `tf.Variable`s when new keys are given: tfjs tensors are
 * immutable, a variable is the tfjs object whose value may change. The
 * fused WebGPU kernel writes the new rows into the variable's GPU buffer
 * (no copy of the cache); every other backend computes the updated cache
 * with composed ops and assigns it (a copy per call, but correct).
 */
import * as tf from '@tensorflow/tfjs-core';

import {AttentionShapes, checkAlibi, checkQKV, checkTensor} from './checks';
import {hasFusedKernel, useFusedKernel} from './dispatch';
import {getImpl, getReferenceBlockElements} from './flags';
import type {FlashAttentionAttrs, FlashAttentionKVCacheAttrs, FlashDecodeQKVAttrs} from './kernel_names';
import {FlashAttentionKVCache, FlashDecodeOut, FlashDecodeQKV} from './kernel_names';
import type {FlashAttentionOptions, OptionSpec} from './options';
import {describeValue, FlashAttentionError, normalizeOptions, parseAttentionOptions} from './options';
import {referenceForward} from './reference/forward';

export interface FlashAttentionWithKVCacheOptions extends
    Omit<FlashAttentionOptions, 'dropoutRate'|'seed'> {
  /** New keys `[B, Snew, Hk, D]`, written into kCache at `cacheSeqlens`. */
  k?: tf.Tensor4D;
  /** New values `[B, Snew, Hk, Dv]`, written into vCache at `cacheSeqlens`. */
  v?: tf.Tensor4D;
  /**
   * Valid rows of each batch row's cache before this call, `[B]` integers
   * (an int32 tensor is read back to the host). Default: the whole cache
   * (only without new keys).
   */
  cacheSeqlens?: number[]|Int32Array|tf.Tensor1D;
  /**
   * Rotary tables `[Sro, rotaryDim / 2]`: q and the new k are rotated at
   * their positions (cacheSeqlens[b] + i) before attention, as flash_attn
   * does; without causal or a window all of q sits at cacheSeqlens[b].
   */
  rotaryCos?: tf.Tensor2D;
  rotarySin?: tf.Tensor2D;
  /** Rotary pairs (0,1), (2,3)... (GPT-J) instead of (i, i + rotaryDim/2). */
  rotaryInterleaved?: boolean;
}

/** Private engine method, as in ops.ts. */
interface KernelFuncRunner {
  runKernelFunc(params: {
    forwardFunc: (backend: tf.KernelBackend, save: (t: tf.Tensor[]) => void) => tf.Tensor[],
    backwardsFunc: (dys: tf.Tensor|tf.Tensor[], saved: tf.Tensor[]) => never,
    inputs: tf.NamedTensorMap,
    attrs: tf.NamedAttrMap,
  }): tf.Tensor[];
}

const OP = 'flashAttentionWithKVCache';

/** The error of any gradient request. */
export function kvCacheGradientError(): never {
  throw new Error(`${OP} is inference only: it has no gradient (use flashAttention to train)`);
}

/** Gradient config of the fused kernel: refuses with a clear message. */
export const flashAttentionKVCacheGradConfig: tf.GradConfig = {
  kernelName: FlashAttentionKVCache,
  gradFunc: () => kvCacheGradientError(),
};

/** A FlashAttentionError about `argument`, with its full message. */
function fail(argument: string, expected: string, actual: unknown, message: string): never {
  throw new FlashAttentionError(OP, argument, expected, describeValue(actual), `${OP}: ${message}`);
}

const isTensor = (v: unknown) => v instanceof tf.Tensor;

/** The options of this op besides the attention options (src/options.ts). */
export const KV_CACHE_OPTION_SPECS: readonly OptionSpec[] = [
  {
    name: 'k',
    expected: 'a tf.Tensor of shape [B, Snew, Hk, D]',
    valid: isTensor,
    aliases: ['k_new', 'new_k', 'key']
  },
  {
    name: 'v',
    expected: 'a tf.Tensor of shape [B, Snew, Hk, Dv]',
    valid: isTensor,
    aliases: ['v_new', 'new_v', 'value']
  },
  {
    name: 'cacheSeqlens',
    expected: 'a number[], Int32Array or int32 tf.Tensor of shape [B]',
    valid: v => Array.isArray(v) || v instanceof Int32Array || isTensor(v),
    aliases: ['cache_seqlens', 'seqlens', 'seqlens_k', 'cache_lengths']
  },
  {
    name: 'rotaryCos',
    expected: 'a tf.Tensor of shape [Sro, rotaryDim / 2]',
    valid: isTensor,
    aliases: ['rotary_cos', 'cos']
  },
  {
    name: 'rotarySin',
    expected: 'a tf.Tensor of shape [Sro, rotaryDim / 2]',
    valid: isTensor,
    aliases: ['rotary_sin', 'sin']
  },
  {
    name: 'rotaryInterleaved',
    expected: 'a boolean',
    valid: v => typeof v === 'boolean',
    aliases: ['rotary_interleaved', 'interleaved']
  },
];

function readSeqlens(
    value: FlashAttentionWithKVCacheOptions['cacheSeqlens'], batch: number, seqMax: number,
    seqNew: number): number[] {
  if (value == null) {
    if (seqNew > 0) {
      fail(
          'cacheSeqlens', `given with new keys (k, v)`, value,
          'cacheSeqlens is required when new keys (k, v) are given');
    }
    return new Array(batch).fill(seqMax);
  }
  let values: number[];
  if (value instanceof tf.Tensor) {
    if (value.rank !== 1 || value.dtype !== 'int32') {
      fail(
          'cacheSeqlens', `an int32 tensor of shape [${batch}]`, value,
          `cacheSeqlens must be an int32 tensor of shape [${batch}], got ${value.dtype} [${
              value.shape}]`);
    }
    values = Array.from(value.dataSync());
  } else {
    values = Array.from(value);  // An array or Int32Array (the option specs checked).
  }
  if (values.length !== batch) {
    fail(
        'cacheSeqlens', `length B = ${batch}`, values,
        `cacheSeqlens must have length B = ${batch}, got ${values.length}`);
  }
  const limit = seqMax - seqNew;
  values.forEach((n, b) => {
    if (!Number.isInteger(n) || n < 0 || n > limit) {
      fail(
          'cacheSeqlens', `integers in [0, ${limit}]`, values,
          `cacheSeqlens[${b}] must be an integer in [0, ${limit}] (Smax - Snew = ${seqMax} - ${
              seqNew}), got ${describeValue(n)}`);
    }
  });
  return values;
}

interface Checked {
  shapes: AttentionShapes;
  seqMax: number;
  seqNew: number;
  cacheSeqlens: number[];
  alibiSlopes: tf.Tensor|undefined;
  attrs: FlashAttentionAttrs;
  rotary: {cos: tf.Tensor2D, sin: tf.Tensor2D, interleaved: boolean}|null;
}

/**
 * The rotary tables of `opts`, checked (rows for `rows` tokens past the longest cache), or null.
 */
function checkRotary(
    opts: FlashAttentionWithKVCacheOptions, headDim: number, cacheSeqlens: number[],
    rows: number): Checked['rotary'] {
  if ((opts.rotaryCos == null) !== (opts.rotarySin == null)) {
    fail(
        opts.rotaryCos == null ? 'rotaryCos' : 'rotarySin', 'given with the other', undefined,
        'rotaryCos and rotarySin must be given together');
  }
  if (opts.rotaryCos != null && opts.rotarySin != null) {
    const layout = '[Sro, rotaryDim / 2]';
    const cos = checkTensor(opts.rotaryCos, 'rotaryCos', OP, 2, layout) as tf.Tensor2D;
    const sin = checkTensor(opts.rotarySin, 'rotarySin', OP, 2, layout) as tf.Tensor2D;
    if (sin.shape[0] !== cos.shape[0] || sin.shape[1] !== cos.shape[1]) {
      fail(
          'rotarySin', `shape [${cos.shape}]`, sin.shape,
          `rotarySin must have the shape of rotaryCos [${cos.shape}], got [${sin.shape}]`);
    }
    if (2 * cos.shape[1] > headDim) {
      fail(
          'rotaryCos', `at most D / 2 = ${headDim / 2} columns`, cos.shape,
          `rotaryCos must have at most D / 2 = ${headDim / 2} columns, got ${cos.shape[1]}`);
    }
    const needed = Math.max(...cacheSeqlens) + rows;
    if (cos.shape[0] < needed) {
      fail(
          'rotaryCos', `at least ${needed} rows`, cos.shape,
          `rotaryCos must have at least max(cacheSeqlens) + max(Sq, Snew) = ${needed} rows, got ${
              cos.shape[0]}`);
    }
    const interleaved = opts.rotaryInterleaved ?? false;
    return {cos, sin, interleaved};
  }
  return null;
}

/**
 * The options both cache entry points share, checked and normalized:
 * per-row cache lengths, ALiBi slopes, the score options, and the rotary
 * tables (rows for `rotaryRows` tokens past the longest cache).
 */
function checkCacheOptions(
    opts: FlashAttentionWithKVCacheOptions, shapes: AttentionShapes, batch: number, seqMax: number,
    seqNew: number, headDim: number,
    rotaryRows: number): Omit<Checked, 'shapes'|'seqMax'|'seqNew'> {
  const cacheSeqlens = readSeqlens(opts.cacheSeqlens, batch, seqMax, seqNew);
  const alibiSlopes = checkAlibi(opts.alibiSlopes, shapes, OP);
  const attrs = normalizeOptions(
      {
        causal: opts.causal,
        softmaxScale: opts.softmaxScale,
        windowSize: opts.windowSize,
        softcap: opts.softcap
      },
      headDim, OP);
  const rotary = checkRotary(opts, headDim, cacheSeqlens, rotaryRows);
  return {cacheSeqlens, alibiSlopes, attrs, rotary};
}

/** Every check of the op, before any work. */
function checkKVCacheCall(
    q: tf.Tensor4D, kCache: tf.Tensor4D, vCache: tf.Tensor4D,
    opts: FlashAttentionWithKVCacheOptions): Checked {
  checkTensor(q, 'q', OP, 4, '[B, Sq, H, D]');
  checkTensor(kCache, 'kCache', OP, 4, '[B, Smax, Hk, D]');
  checkTensor(vCache, 'vCache', OP, 4, '[B, Smax, Hk, Dv]');
  opts = parseAttentionOptions<FlashAttentionWithKVCacheOptions>(opts, OP, KV_CACHE_OPTION_SPECS);
  const loose = opts as FlashAttentionOptions;
  if (loose.dropoutRate != null && loose.dropoutRate !== 0) {
    fail(
        'dropoutRate', '0 (inference only)', loose.dropoutRate,
        `dropoutRate is not supported (inference only), got ${describeValue(loose.dropoutRate)}`);
  }
  const shapes =
      checkQKV(q.shape, kCache.shape, vCache.shape, OP, {q: 'q', k: 'kCache', v: 'vCache'});
  const [batch, seqMax, headsKV, headDim] = kCache.shape;
  const {k, v} = opts;
  let seqNew = 0;
  if ((k == null) !== (v == null)) {
    fail(
        k == null ? 'k' : 'v', 'given with the other', undefined,
        `k and v must be given together, got ${k == null ? 'v only' : 'k only'}`);
  }
  if (k != null && v != null) {
    checkTensor(k, 'k', OP, 4, '[B, Snew, Hk, D]');
    checkTensor(v, 'v', OP, 4, '[B, Snew, Hk, Dv]');
    seqNew = k.shape[1];
    const kWant = [batch, seqNew, headsKV, headDim];
    const vWant = [batch, seqNew, headsKV, shapes.headDimV];
    if (k.shape.some((d, i) => d !== kWant[i])) {
      fail(
          'k', `shape [${kWant}]`, k.shape,
          `k must have shape [B, Snew, Hk, D] = [${kWant}], got [${k.shape}]`);
    }
    if (v.shape.some((d, i) => d !== vWant[i])) {
      fail(
          'v', `shape [${vWant}]`, v.shape,
          `v must have shape [B, Snew, Hk, Dv] = [${vWant}], got [${v.shape}]`);
    }
    for (const [name, cache] of [['kCache', kCache], ['vCache', vCache]] as const) {
      if (!(cache instanceof tf.Variable)) {
        fail(
            name, 'a tf.Variable', cache,
            `${name} must be a tf.Variable when new keys are given (it is updated in place), ` +
                `got a ${cache.constructor.name}`);
      }
    }
  }
  const {cacheSeqlens, alibiSlopes, attrs, rotary} = checkCacheOptions(
      opts, shapes, batch, seqMax, seqNew, headDim, Math.max(shapes.seqQ, seqNew));
  return {shapes, seqMax, seqNew, cacheSeqlens, alibiSlopes, attrs, rotary};
}

/**
 * Rotates `x [B, S, H, D]`: batch row b at table rows `starts[b]` ..
 * `starts[b] + S - 1`, or all at `starts[b]` when `sameRow` (flash_attn's
 * non-causal q). Slices of the tables, no index upload per call.
 */
export function rotateAt(
    x: tf.Tensor4D, cos: tf.Tensor2D, sin: tf.Tensor2D, starts: number[], sameRow: boolean,
    interleaved: boolean): tf.Tensor4D {
  return tf.tidy(() => {
    const [batch, seq, heads, headDim] = x.shape;
    const half = cos.shape[1];
    const rotaryDim = 2 * half;
    // [B or 1, S or 1, 1, half]: broadcasts over heads (and rows).
    const rows = sameRow ? 1 : seq;
    const rowsOf = (table: tf.Tensor2D) => {
      if (starts.every(n => n === starts[0])) {
        return tf.reshape(tf.slice(table, [starts[0], 0], [rows, half]), [1, rows, 1, half]);
      }
      const perBatch = starts.map(start => tf.slice(table, [start, 0], [rows, half]));
      return tf.reshape(tf.stack(perBatch), [batch, rows, 1, half]);
    };
    const c = rowsOf(cos);
    const s = rowsOf(sin);
    const rotated = tf.slice(x, [0, 0, 0, 0], [batch, seq, heads, rotaryDim]);
    let x1: tf.Tensor;
    let x2: tf.Tensor;
    if (interleaved) {
      [x1, x2] = tf.unstack(tf.reshape(rotated, [batch, seq, heads, half, 2]), 4);
    } else {
      [x1, x2] = tf.split(rotated, 2, 3);
    }
    const y1 = tf.sub(tf.mul(x1, c), tf.mul(x2, s));
    const y2 = tf.add(tf.mul(x2, c), tf.mul(x1, s));
    const y = interleaved ? tf.reshape(tf.stack([y1, y2], 4), [batch, seq, heads, rotaryDim]) :
                            tf.concat([y1, y2], 3);
    if (rotaryDim === headDim) {
      return y as tf.Tensor4D;
    }
    const rest = tf.slice(x, [0, 0, 0, rotaryDim], [batch, seq, heads, headDim - rotaryDim]);
    return tf.concat([y, rest], 3) as tf.Tensor4D;
  });
}

/** The cache with `update` written at each row's offset (composed ops). */
function composedAppend(
    cache: tf.Tensor4D, update: tf.Tensor4D, cacheSeqlens: number[]): tf.Tensor4D {
  return tf.tidy(() => {
    const [batch, seqMax, heads, dim] = cache.shape;
    const seqNew = update.shape[1];
    const rows = cacheSeqlens.map((start, b) => {
      const pieces: tf.Tensor4D[] = [];
      if (start > 0) {
        pieces.push(tf.slice(cache, [b, 0, 0, 0], [1, start, heads, dim]));
      }
      pieces.push(tf.slice(update, [b, 0, 0, 0], [1, seqNew, heads, dim]));
      const end = start + seqNew;
      if (end < seqMax) {
        pieces.push(tf.slice(cache, [b, end, 0, 0], [1, seqMax - end, heads, dim]));
      }
      return tf.concat(pieces, 1);
    });
    return (batch === 1 ? rows[0] : tf.concat(rows, 0)) as tf.Tensor4D;
  });
}

/** Attention of each batch row over its first `seqlensK[b]` keys (composed). */
function referenceKVCache(
    q: tf.Tensor4D, kCache: tf.Tensor4D, vCache: tf.Tensor4D, seqlensK: number[],
    alibiSlopes: tf.Tensor|undefined, shapes: AttentionShapes,
    attrs: FlashAttentionAttrs): [tf.Tensor4D, tf.Tensor3D] {
  const blockElements = getReferenceBlockElements();
  return tf.tidy(() => {
    const {seqQ, heads, headsKV, headDim, headDimV} = shapes;
    const outs: tf.Tensor4D[] = [];
    const lses: tf.Tensor3D[] = [];
    seqlensK.forEach((seqK, b) => {
      if (seqK === 0) {  // No key: out 0, lse -inf (docs/design.md, "Semantics").
        outs.push(tf.zeros([1, seqQ, heads, headDimV]));
        lses.push(tf.fill([1, heads, seqQ], -Infinity) as tf.Tensor3D);
        return;
      }
      const qb = tf.slice(q, [b, 0, 0, 0], [1, seqQ, heads, headDim]);
      const kb = tf.slice(kCache, [b, 0, 0, 0], [1, seqK, headsKV, headDim]);
      const vb = tf.slice(vCache, [b, 0, 0, 0], [1, seqK, headsKV, headDimV]);
      const slopes = alibiSlopes == null ? null :
          alibiSlopes.rank === 2         ? tf.slice(alibiSlopes, [b, 0], [1, heads]) :
                                           alibiSlopes;
      const [out, lse] =
          referenceForward(qb, kb, vb, slopes, {...shapes, batch: 1, seqK}, attrs, blockElements);
      outs.push(out);
      lses.push(lse);
    });
    return [
      (outs.length === 1 ? outs[0] : tf.concat(outs, 0)) as tf.Tensor4D,
      (lses.length === 1 ? lses[0] : tf.concat(lses, 0)) as tf.Tensor3D,
    ];
  });
}

/** Does some other tensor share the data of this one (in-place unsafe)? */
function sharesData(t: tf.Tensor): boolean {
  const backend = tf.backend() as unknown as {refCount?: (dataId: object) => number};
  return typeof backend.refCount !== 'function' || backend.refCount(t.dataId) > 1;
}

function flashAttentionWithKVCache_(
    q: tf.Tensor4D, kCache: tf.Tensor4D, vCache: tf.Tensor4D,
    opts: FlashAttentionWithKVCacheOptions = {}): tf.Tensor4D|[tf.Tensor4D, tf.Tensor3D] {
  const c = checkKVCacheCall(q, kCache, vCache, opts);
  const {shapes, seqNew, cacheSeqlens, alibiSlopes, attrs, rotary} = c;
  const seqlensK = cacheSeqlens.map(n => n + seqNew);
  const kernelAttrs: FlashAttentionKVCacheAttrs = {...attrs, cacheSeqlens};
  const fused = useFusedKernel(FlashAttentionKVCache, shapes, kernelAttrs);
  const appendInPlace =
      fused && opts.k != null && opts.v != null && !sharesData(kCache) && !sharesData(vCache);
  // flash_attn: q moves with the new keys only when causal or local.
  const local = attrs.windowLeft >= 0 || attrs.windowRight >= 0;
  // The fused kernel rotates q and the new keys itself (one dispatch, no
  // upload); it cannot when the new keys go through a composed append.
  const rotaryInKernel = rotary != null && fused && (opts.k == null || appendInPlace);
  let qIn = q;
  let kNew = opts.k;
  if (rotary != null && !rotaryInKernel) {
    if (kNew != null && local && seqNew === shapes.seqQ) {
      // Same positions: one rotation of q and k side by side.
      const both = rotateAt(
          tf.concat([q, kNew], 2), rotary.cos, rotary.sin, cacheSeqlens, false, rotary.interleaved);
      [qIn, kNew] = tf.split(both, [shapes.heads, shapes.headsKV], 2) as [tf.Tensor4D, tf.Tensor4D];
    } else {
      qIn = rotateAt(q, rotary.cos, rotary.sin, cacheSeqlens, !local, rotary.interleaved);
      if (kNew != null) {
        kNew = rotateAt(kNew, rotary.cos, rotary.sin, cacheSeqlens, false, rotary.interleaved);
      }
    }
  }
  if (rotaryInKernel) {
    kernelAttrs.rotaryInterleaved = rotary!.interleaved;
    kernelAttrs.rotaryQSameRow = !local;
  }
  let out: tf.Tensor4D;
  let lse: tf.Tensor3D;
  if (fused) {
    const inputs: tf.NamedTensorMap = {q: qIn, kCache, vCache};
    if (rotaryInKernel) {
      inputs.rotaryCos = rotary!.cos;
      inputs.rotarySin = rotary!.sin;
    }
    if (kNew != null && opts.v != null) {
      if (!appendInPlace) {
        // Another tensor holds this data: writing in place would change it.
        (kCache as tf.Variable).assign(composedAppend(kCache, kNew, cacheSeqlens));
        (vCache as tf.Variable).assign(composedAppend(vCache, opts.v, cacheSeqlens));
        kernelAttrs.cacheSeqlens = seqlensK;
      } else {
        inputs.k = kNew;
        inputs.v = opts.v;
      }
    }
    if (alibiSlopes != null) {
      inputs.alibiSlopes = alibiSlopes;
    }
    [out, lse] = tf.engine().runKernel(
                     FlashAttentionKVCache, inputs,
                     kernelAttrs as unknown as tf.NamedAttrMap) as [tf.Tensor4D, tf.Tensor3D];
  } else {
    if (kNew != null && opts.v != null) {
      (kCache as tf.Variable).assign(composedAppend(kCache, kNew, cacheSeqlens));
      (vCache as tf.Variable).assign(composedAppend(vCache, opts.v, cacheSeqlens));
    }
    const engine = tf.engine() as unknown as KernelFuncRunner;
    [out, lse] = engine.runKernelFunc({
      forwardFunc: () =>
          referenceKVCache(qIn, kCache, vCache, seqlensK, alibiSlopes, shapes, attrs),
      backwardsFunc: () => kvCacheGradientError(),
      inputs: {q: qIn, kCache, vCache},
      attrs: kernelAttrs as unknown as tf.NamedAttrMap,
    }) as [tf.Tensor4D, tf.Tensor3D];
  }
  if (opts.returnSoftmaxLse) {
    return [out, lse];
  }
  lse.dispose();
  return out;
}

type WithLse = FlashAttentionWithKVCacheOptions&{returnSoftmaxLse: true};
type WithoutLse = FlashAttentionWithKVCacheOptions&{returnSoftmaxLse?: false};

export interface FlashAttentionWithKVCacheOp {
  (q: tf.Tensor4D, kCache: tf.Tensor4D, vCache: tf.Tensor4D,
   opts: WithLse): [tf.Tensor4D, tf.Tensor3D];
  (q: tf.Tensor4D, kCache: tf.Tensor4D, vCache: tf.Tensor4D, opts?: WithoutLse): tf.Tensor4D;
  (q: tf.Tensor4D, kCache: tf.Tensor4D, vCache: tf.Tensor4D,
   opts?: FlashAttentionWithKVCacheOptions): tf.Tensor4D|[tf.Tensor4D, tf.Tensor3D];
}

/**
 * Attention of q `[B, Sq, H, D]` over the caches `[B, Smax, Hk, D|Dv]`:
 * each batch row b sees its first `cacheSeqlens[b]` cached keys plus the
 * new keys `opts.k`, which are first written into the caches (tf.Variables)
 * at `cacheSeqlens[b]`. Causal masks align to the bottom right of the
 * valid keys. Inference only.
 *
 * @returns `[B, Sq, H, Dv]`, or `[out, softmaxLse [B, H, Sq]]` with
 *     `returnSoftmaxLse`.
 */
export const flashAttentionWithKVCache =
    tf.op({flashAttentionWithKVCache_}) as FlashAttentionWithKVCacheOp;

/** The options of flashAttentionWithKVCachePacked: those of the op but the new keys. */
export type PackedKVCacheOptions =
    Omit<FlashAttentionWithKVCacheOptions, 'k'|'v'|'returnSoftmaxLse'>&{cacheSeqlens: number[]};

/**
 * flashAttentionWithKVCache for a fused projection's output: the q, k and v
 * heads of the new tokens side by side in `qkv [B, Snew, H + 2 Hk, D]`
 * (Dv = D, Sq = Snew), the new keys and values appended to the caches. On
 * webgpu one pass takes q (rotated) and writes k and v into the caches
 * straight from the packed tensor, so the projection needs no split (three
 * kernels per layer and token fewer); elsewhere, or when the caches cannot
 * be written in place, it is split and flashAttentionWithKVCache runs.
 */
export function flashAttentionWithKVCachePacked(
    qkv: tf.Tensor4D, kCache: tf.Tensor4D, vCache: tf.Tensor4D, heads: number,
    opts: PackedKVCacheOptions): tf.Tensor4D {
  checkTensor(qkv, 'qkv', OP, 4, '[B, Snew, H + 2 Hk, D]');
  checkTensor(kCache, 'kCache', OP, 4, '[B, Smax, Hk, D]');
  checkTensor(vCache, 'vCache', OP, 4, '[B, Smax, Hk, Dv]');
  const [batch, seqNew, packed, headDim] = qkv.shape;
  const [, seqMax, headsKV] = kCache.shape;
  if (packed !== heads + 2 * headsKV) {
    fail(
        'qkv', `H + 2 Hk = ${heads + 2 * headsKV} heads on axis 2`, qkv.shape,
        `qkv must have H + 2 Hk = ${heads} + 2 * ${headsKV} heads on axis 2, got [${qkv.shape}]`);
  }
  if (vCache.shape[3] !== headDim) {
    fail(
        'vCache', `head dim D = ${headDim} (packed values)`, vCache.shape,
        `vCache must have the head dim of qkv, D = ${headDim}, got [${vCache.shape}]`);
  }
  // Every check first: the fallback below would split before its own.
  opts = parseAttentionOptions<PackedKVCacheOptions>(opts, OP, KV_CACHE_OPTION_SPECS);
  const dropout = (opts as FlashAttentionOptions).dropoutRate;
  if (dropout != null && dropout !== 0) {
    fail(
        'dropoutRate', '0 (inference only)', dropout,
        `dropoutRate is not supported (inference only), got ${describeValue(dropout)}`);
  }
  for (const [name, cache] of [['kCache', kCache], ['vCache', vCache]] as const) {
    if (!(cache instanceof tf.Variable)) {
      fail(
          name, 'a tf.Variable', cache,
          `${name} must be a tf.Variable (it is updated in place), got a ${
              cache.constructor.name}`);
    }
  }
  const shapes = checkQKV(
      [batch, seqNew, heads, headDim], kCache.shape, vCache.shape, OP,
      {q: 'qkv', k: 'kCache', v: 'vCache'});
  const {cacheSeqlens, alibiSlopes, attrs, rotary} =
      checkCacheOptions(opts, shapes, batch, seqMax, seqNew, headDim, seqNew);
  const kernelAttrs: FlashAttentionKVCacheAttrs = {...attrs, cacheSeqlens};
  if (!useFusedKernel(FlashAttentionKVCache, shapes, kernelAttrs) || sharesData(kCache) ||
      sharesData(vCache)) {
    return tf.tidy(() => {
      const [q, k, v] = tf.split(qkv, [heads, headsKV, headsKV], 2) as tf.Tensor4D[];
      return flashAttentionWithKVCache(q, kCache, vCache, {...opts, k, v}) as tf.Tensor4D;
    });
  }
  kernelAttrs.packedHeads = heads;
  const inputs: tf.NamedTensorMap = {q: qkv, kCache, vCache};
  if (rotary != null) {
    inputs.rotaryCos = rotary.cos;
    inputs.rotarySin = rotary.sin;
    kernelAttrs.rotaryInterleaved = rotary.interleaved;
  }
  // flash_attn: q moves with the new keys only when causal or local.
  kernelAttrs.rotaryQSameRow = attrs.windowLeft < 0 && attrs.windowRight < 0;
  if (alibiSlopes != null) {
    inputs.alibiSlopes = alibiSlopes;
  }
  const [out, lse] = tf.engine().runKernel(
                         FlashAttentionKVCache, inputs,
                         kernelAttrs as unknown as tf.NamedAttrMap) as [tf.Tensor4D, tf.Tensor3D];
  lse.dispose();
  return out;
}

export interface DecodeQKVArgs {
  /** The new tokens' (normalized) layer input `[B * Snew, K]`, batch-major. */
  x: tf.Tensor2D;
  /** The packed projection `[K, (H + 2 Hk) D]` and its bias. */
  w: tf.Tensor2D;
  bias?: tf.Tensor1D|null;
  heads: number;
  /** The caches `[B, Smax, Hk, D]` (variables, written in place). */
  kCache: tf.Tensor4D;
  vCache: tf.Tensor4D;
  /** Valid rows of each batch row before this step. */
  cacheSeqlens: readonly number[];
  /** Tables `[Sro, rotaryDim / 2]` (as flashAttentionWithKVCache's). */
  rotary?: {cos: tf.Tensor2D, sin: tf.Tensor2D, interleaved: boolean}|null;
}

/** Most rows (B * Snew) and the longest row flashDecodeQKVOrNull takes. */
export const DECODE_QKV_MAX_ROWS = 8;
export const DECODE_QKV_MAX_INNER = 4096;

const QKV_OP = 'flashDecodeQKVOrNull';

function failQKV(argument: string, expected: string, actual: unknown): never {
  const shown = describeValue(actual);
  throw new FlashAttentionError(
      QKV_OP, argument, expected, shown,
      `${QKV_OP}: ${argument} must be ${expected}, got ${shown}`);
}

function checkShape(t: tf.Tensor, name: string, want: readonly number[]): void {
  if (!(t instanceof tf.Tensor) || t.isDisposed) {
    failQKV(name, 'a live tensor', t);
  }
  if (t.dtype !== 'float32' || t.rank !== want.length || t.shape.some((d, i) => d !== want[i])) {
    failQKV(name, `a float32 tensor of shape [${want}]`, `${t.dtype} [${t.shape}]`);
  }
}

/**
 * The first pass of a decode step from a layer's (normalized) input, where
 * one kernel does it (webgpu): its packed qkv projection, rotary of the q
 * and k heads at positions `cacheSeqlens[b] + s`, and the new keys and
 * values written into the caches at those rows. Returns q `[B, Snew, H, D]`
 * (rotated); attention then runs over the caches with `cacheSeqlens[b] +
 * Snew` valid rows. Null, before any work, where no such kernel runs
 * (other backends, FLASH_ATTENTION_IMPL=reference, more than
 * DECODE_QKV_MAX_ROWS rows, K > DECODE_QKV_MAX_INNER, or a cache sharing
 * its data): the caller then projects and attends as before. Bad
 * arguments throw. Inference only.
 */
export function flashDecodeQKVOrNull(args: DecodeQKVArgs): tf.Tensor4D|null {
  const {x, w, bias, heads, kCache, vCache, cacheSeqlens, rotary} = args;
  if (!(x instanceof tf.Tensor) || x.rank !== 2) {
    failQKV('x', 'a tensor of rank 2 [B * Snew, K]', x instanceof tf.Tensor ? x.shape : x);
  }
  for (const [name, cache] of [['kCache', kCache], ['vCache', vCache]] as const) {
    if (!(cache instanceof tf.Variable) || cache.rank !== 4) {
      failQKV(name, 'a tf.Variable of shape [B, Smax, Hk, D]', cache);
    }
  }
  const [batch, seqMax, headsKV, headDim] = kCache.shape;
  const [rows, inner] = x.shape;
  const seqNew = rows / batch;
  if (!Number.isInteger(seqNew) || seqNew < 1) {
    failQKV('x', `B * Snew rows (B = ${batch})`, x.shape);
  }
  checkShape(x, 'x', x.shape);
  checkShape(vCache, 'vCache', kCache.shape);
  if (!Number.isInteger(heads) || heads < 1 || heads % headsKV !== 0) {
    failQKV('heads', `a positive multiple of Hk = ${headsKV}`, heads);
  }
  const cols = (heads + 2 * headsKV) * headDim;
  checkShape(w, 'w', [inner, cols]);
  if (bias != null) {
    checkShape(bias, 'bias', [cols]);
  }
  if (cacheSeqlens.length !== batch) {
    failQKV('cacheSeqlens', `${batch} lengths (B)`, cacheSeqlens);
  }
  let longest = 0;
  for (const n of cacheSeqlens) {
    if (!Number.isInteger(n) || n < 0 || n > seqMax - seqNew) {
      failQKV('cacheSeqlens', `integers in [0, Smax - Snew = ${seqMax - seqNew}]`, cacheSeqlens);
    }
    longest = Math.max(longest, n);
  }
  if (rotary != null) {
    checkShape(rotary.cos, 'rotaryCos', rotary.cos?.shape ?? []);
    const [tableRows, half] = rotary.cos.shape;
    if (rotary.cos.rank !== 2 || 2 * half > headDim || half < 1) {
      failQKV('rotaryCos', `a tensor [Sro, rotaryDim / 2 <= ${headDim / 2}]`, rotary.cos.shape);
    }
    if (tableRows < longest + seqNew) {
      failQKV('rotaryCos', `at least ${longest + seqNew} rows`, rotary.cos.shape);
    }
    checkShape(rotary.sin, 'rotarySin', rotary.cos.shape);
  }
  if (getImpl() === 'reference' || !hasFusedKernel(FlashDecodeQKV, tf.getBackend()) ||
      rows > DECODE_QKV_MAX_ROWS || inner > DECODE_QKV_MAX_INNER || sharesData(kCache) ||
      sharesData(vCache)) {
    return null;
  }
  const attrs: FlashDecodeQKVAttrs = {
    heads,
    cacheSeqlens: cacheSeqlens.slice(),
    hasBias: bias != null,
    hasRotary: rotary != null,
    rotaryInterleaved: rotary?.interleaved ?? false,
  };
  // Absent inputs are bound to x (never read): no tensor made per call.
  const inputs: tf.NamedTensorMap = {
    x,
    w,
    bias: bias ?? x,
    rotaryCos: rotary?.cos ?? x,
    rotarySin: rotary?.sin ?? x,
    kCache,
    vCache,
  };
  return tf.engine().runKernel(FlashDecodeQKV, inputs, attrs as unknown as tf.NamedAttrMap) as
      tf.Tensor4D;
}

/** Most attention output width (H Dv) flashDecodeOutOrNull takes (workgroup memory). */
export const DECODE_OUT_MAX_INNER = 4096;

/**
 * Attention of a decode step's q `[B, Sq, H, D]` over the caches, whose
 * valid rows (`cacheSeqlens`, the step's new keys included) are already
 * written (flashDecodeQKVOrNull), followed by the layer's output
 * projection `w [H Dv, N]` (+ `bias`), in one kernel where there is one
 * (webgpu: split-KV, then the merge of the splits and the projection in
 * one pass): `y [B * Sq, N]`. Null, before any work, where it does not run
 * (other backends, FLASH_ATTENTION_IMPL=reference, more than
 * DECODE_QKV_MAX_ROWS tokens, H Dv > DECODE_OUT_MAX_INNER): the caller
 * then runs flashAttentionWithKVCache and the projection. The options are
 * flashAttentionWithKVCache's (no new keys, no rotary: q is rotated).
 * Bad arguments throw. Inference only.
 */
export function flashDecodeOutOrNull(
    q: tf.Tensor4D, kCache: tf.Tensor4D, vCache: tf.Tensor4D, cacheSeqlens: readonly number[],
    opts: Omit<FlashAttentionWithKVCacheOptions, 'k'|'v'|'cacheSeqlens'|'returnSoftmaxLse'>,
    w: tf.Tensor2D, bias: tf.Tensor1D|null): tf.Tensor2D|null {
  const c = preparedDecodeCall(q, kCache, vCache, cacheSeqlens, opts);
  const {heads, headDimV, batch, seqQ} = c.shapes;
  checkShape(w, 'w', [heads * headDimV, w.shape[1]]);
  if (bias != null) {
    checkShape(bias, 'bias', [w.shape[1]]);
  }
  if (batch * seqQ > DECODE_QKV_MAX_ROWS || heads * headDimV > DECODE_OUT_MAX_INNER ||
      !useFusedKernel(FlashDecodeOut, c.shapes, c.attrs)) {
    return null;
  }
  const inputs: tf.NamedTensorMap = {q, kCache, vCache, w, bias: bias ?? q};
  if (c.alibiSlopes != null) {
    inputs.alibiSlopes = c.alibiSlopes;
  }
  const attrs = {...c.attrs, cacheSeqlens: cacheSeqlens.slice(), hasBias: bias != null};
  return tf.engine().runKernel(FlashDecodeOut, inputs, attrs as unknown as tf.NamedAttrMap) as
      tf.Tensor2D;
}

/**
 * The last call's checked options, with what they were checked for: a
 * decode loop passes the same options at every step, so a step whose
 * tensors, option keys and values match field by field skips the option
 * checks (no strings, no objects) and checks only its lengths.
 */
interface PreparedDecode {
  q: readonly number[];
  kCache: tf.Tensor;
  vCache: tf.Tensor;
  keys: string[];
  causal: unknown;
  softmaxScale: unknown;
  window: unknown;
  windowLeft: unknown;
  windowRight: unknown;
  softcap: unknown;
  alibiSlopes: unknown;
  checked: Checked;
}
let lastDecode: PreparedDecode|null = null;

function samePrepared(
    p: PreparedDecode, q: tf.Tensor, kCache: tf.Tensor, vCache: tf.Tensor,
    opts: FlashAttentionWithKVCacheOptions): boolean {
  const window = opts.windowSize;
  if (p.kCache !== kCache || p.vCache !== vCache || kCache.isDisposed || vCache.isDisposed ||
      q.isDisposed || q.rank !== 4 || p.causal !== opts.causal ||
      p.softmaxScale !== opts.softmaxScale || p.window !== window ||
      (window != null && (p.windowLeft !== window[0] || p.windowRight !== window[1])) ||
      p.softcap !== opts.softcap || p.alibiSlopes !== opts.alibiSlopes ||
      (opts.alibiSlopes != null && opts.alibiSlopes.isDisposed)) {
    return false;
  }
  for (let i = 0; i < 4; i++) {
    if (q.shape[i] !== p.q[i]) {
      return false;
    }
  }
  let n = 0;
  for (const key in opts) {
    if (key !== p.keys[n++]) {
      return false;
    }
  }
  return n === p.keys.length;
}

/** The checks of flashAttentionWithKVCache for a call without new keys. */
function preparedDecodeCall(
    q: tf.Tensor4D, kCache: tf.Tensor4D, vCache: tf.Tensor4D, cacheSeqlens: readonly number[],
    opts: FlashAttentionWithKVCacheOptions): Checked {
  const last = lastDecode;
  if (last != null && opts != null && samePrepared(last, q, kCache, vCache, opts)) {
    const seqMax = kCache.shape[1];
    let ok = cacheSeqlens.length === last.checked.cacheSeqlens.length;
    for (let b = 0; ok && b < cacheSeqlens.length; b++) {
      const n = cacheSeqlens[b];
      ok = Number.isInteger(n) && n >= 0 && n <= seqMax;
    }
    if (ok) {
      return last.checked;
    }
  }
  if (opts != null && typeof opts === 'object' &&
      (opts.rotaryCos != null || opts.rotarySin != null || opts.k != null || opts.v != null)) {
    fail(
        opts.k != null || opts.v != null ? 'k' : 'rotaryCos', 'absent (q is rotated, keys written)',
        'given', 'new keys and rotary tables are not taken here (q is rotated, keys written)');
  }
  const checked =
      checkKVCacheCall(q, kCache, vCache, {...opts, cacheSeqlens: cacheSeqlens as number[]});
  const window = opts?.windowSize;
  lastDecode = {
    q: q.shape.slice(),
    kCache,
    vCache,
    keys: Object.keys(opts ?? {}),
    causal: opts?.causal,
    softmaxScale: opts?.softmaxScale,
    window,
    windowLeft: window?.[0],
    windowRight: window?.[1],
    softcap: opts?.softcap,
    alibiSlopes: opts?.alibiSlopes,
    checked,
  };
  return checked;
}
