/**
 * The public options of the flashAttention ops and their normalization into
 * kernel attributes (docs/design.md, "Semantics"; docs/options.md lists
 * every option and its errors).
 *
 * Validation is table-driven: one `OptionSpec` per option. Ops with options
 * of their own call `parseAttentionOptions(opts, opName, extraSpecs)` with
 * their extra specs, so every op rejects unknown keys, suggests the option
 * meant and checks types the same way.
 */
import {Tensor} from '@tensorflow/tfjs-core';

import {randomSeed, splitSeed} from './dropout';
import {describeValue, FlashAttentionError, invalidArgument} from './errors';
import type {FlashAttentionAttrs} from './kernel_names';

export {describeValue, FlashAttentionError} from './errors';

export interface FlashAttentionOptions {
  /** Causal mask, aligned to the bottom-right when `Sq != Sk`. */
  causal?: boolean;
  /** Multiplies q.k; defaults to `1 / sqrt(headDim)`. */
  softmaxScale?: number;
  /**
   * `[left, right]`: query i sees keys in
   * `[i + Sk - Sq - left, i + Sk - Sq + right]`; -1 = unbounded. A side
   * >= Sk is unbounded too (it becomes -1).
   */
  windowSize?: [number, number];
  /** Soft-capping of the scores: `softcap * tanh(s / softcap)`; 0 = off. */
  softcap?: number;
  /**
   * ALiBi slopes, `[H]` or `[B, H]` float32: adds
   * `-slope * |i + Sk - Sq - j|` to each score. Not differentiated (its
   * gradient is zero, as in flash_attn).
   */
  alibiSlopes?: Tensor;
  /** Attention dropout probability in [0, 1); 0 (the default) = off. */
  dropoutRate?: number;
  /**
   * Seed of the dropout mask (integer in [0, 2^53)). The same seed gives the
   * same mask on every backend. A random one is drawn when absent.
   */
  seed?: number;
  /** Also return the softmax log-sum-exp, `[B, H, Sq]`. */
  returnSoftmaxLse?: boolean;
  /**
   * `[B]` int32: batch row b has only its first `seqlensQ[b]` query rows
   * (clamped to [0, Sq]); later rows output 0 (lse -Infinity) and get no
   * gradient. The causal/window/ALiBi diagonal becomes
   * `i + seqlenK_b - seqlenQ_b` (docs/varlen.md).
   */
  seqlensQ?: Tensor;
  /**
   * `[B]` int32: batch row b attends to its first `seqlensK[b]` keys only
   * (clamped to [0, Sk]); the fused kernels skip the rest by tile.
   */
  seqlensK?: Tensor;
  /**
   * `[B, Sk]` bool key padding mask (true = a real key), each row real keys
   * then padding: keys from the first false on are hidden, as with
   * `seqlensK`, but the causal/window/ALiBi diagonal stays at the padded
   * `i + Sk - Sq` (masking keys does not move them). The lengths are
   * computed on the device. A mask whose values are in host memory is
   * checked (not a padding mask: an error); one that lives on the GPU is
   * not read back (docs/varlen.md).
   */
  keyPaddingMask?: Tensor;
  /**
   * 'float32' (the default): results within float32 accuracy bounds on
   * every backend. 'float16': where the WebGPU tensor-core path runs
   * (docs/tensor_cores.md), one float16 matrix product with float32
   * accumulation, faster, with the error bound documented there; other
   * kernels ignore it and stay float32.
   */
  precision?: 'float32'|'float16';
}

/** One option: its name, what it must be, and the names users mistype. */
export interface OptionSpec {
  name: string;
  /** What a valid value is, as printed in errors ("a boolean"). */
  expected: string;
  /** Is `value` (never undefined) valid? */
  valid: (value: unknown) => boolean;
  /**
   * Names users write for this option (flash_attn, PyTorch, typos); an
   * unknown key equal to one of them (ignoring case and `_`) is suggested.
   */
  aliases?: string[];
}

/** Smallest positive normal float32: GPUs may flush smaller ones to 0. */
const MIN_NORMAL_F32 = 2 ** -126;

const isBoolean = (v: unknown) => typeof v === 'boolean';
const isNumber = (v: unknown): v is number => typeof v === 'number';
/** Finite as the float32 the kernels receive. */
const finiteF32 = (v: unknown) => isNumber(v) && Number.isFinite(Math.fround(v));
const windowSide = (w: unknown) => Number.isInteger(w) && (w as number) >= -1;

/** The options of flashAttention and its packed variants. */
export const ATTENTION_OPTION_SPECS: readonly OptionSpec[] = [
  {
    name: 'causal',
    expected: 'a boolean',
    valid: isBoolean,
    aliases: ['casual', 'is_causal', 'causal_mask', 'use_causal_mask', 'causual'],
  },
  {
    name: 'softmaxScale',
    expected: 'a number finite as a float32 (|x| < 3.4e38)',
    valid: finiteF32,
    aliases: ['scale', 'softmax_scale', 'sm_scale', 'attn_scale', 'scaling'],
  },
  {
    name: 'windowSize',
    expected: '[left, right] with integers >= -1 (-1 = unbounded)',
    valid: w => Array.isArray(w) && w.length === 2 && w.every(windowSide),
    aliases: ['window_size', 'window', 'sliding_window', 'local_window'],
  },
  {
    name: 'softcap',
    expected: 'a number >= 0 (0 = off; else a normal float32: >= 1.18e-38, < 3.4e38)',
    valid: v => v === 0 || (finiteF32(v) && Math.fround(v as number) >= MIN_NORMAL_F32),
    aliases:
        ['soft_cap', 'logit_softcap', 'logits_soft_cap', 'softcapping', 'attn_logit_softcapping'],
  },
  {
    name: 'alibiSlopes',
    expected: 'a tf.Tensor of shape [H] or [B, H]',
    valid: v => v instanceof Tensor,
    aliases: ['alibi_slopes', 'alibi', 'slopes'],
  },
  {
    name: 'dropoutRate',
    expected: 'a number in [0, 1)',
    valid: v => isNumber(v) && v >= 0 && Math.fround(v) < 1,
    aliases: ['dropout_p', 'dropout', 'dropout_rate', 'attn_dropout', 'p', 'rate'],
  },
  {
    name: 'seed',
    expected: 'an integer in [0, 2^53)',
    valid: v => Number.isInteger(v) && (v as number) >= 0 && (v as number) < 2 ** 53,
    aliases: ['generator', 'rng', 'random_seed', 'rng_state'],
  },
  {
    name: 'returnSoftmaxLse',
    expected: 'a boolean',
    valid: isBoolean,
    aliases:
        ['return_softmax_lse', 'return_lse', 'return_attn_probs', 'return_softmax', 'returnLse'],
  },
  {
    name: 'precision',
    expected: "'float32' or 'float16'",
    valid: v => v === 'float32' || v === 'float16',
    aliases: ['dtype', 'compute_dtype', 'matmul_precision'],
  },
];

/** Keys of flash_attn and PyTorch with no counterpart: why, not a typo. */
const UNSUPPORTED: Record<string, string> = {
  deterministic: 'the backward passes of this package are deterministic already',
  attnmask: 'use causal, windowSize or alibiSlopes, or the layers\' masked attention',
  blocktable: 'paged KV caches are not supported',
};

const canonical = (name: string) => name.toLowerCase().replace(/_/g, '');

/** Levenshtein distance, for "did you mean" on plain typos. */
function editDistance(a: string, b: string): number {
  let prev = Array.from({length: b.length + 1}, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) {
      row[j] = Math.min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = row;
  }
  return prev[b.length];
}

/** The option an unknown key most likely meant, or null. */
export function suggestOption(key: string, specs: readonly OptionSpec[]): string|null {
  const c = canonical(key);
  for (const spec of specs) {
    if (canonical(spec.name) === c || (spec.aliases ?? []).some(a => canonical(a) === c)) {
      return spec.name;
    }
  }
  let best: string|null = null;
  let bestDistance = Infinity;
  for (const spec of specs) {
    const d = editDistance(c, canonical(spec.name));
    if (d < bestDistance && d <= Math.max(1, Math.floor(spec.name.length / 4))) {
      best = spec.name;
      bestDistance = d;
    }
  }
  return best;
}

/**
 * Checks an options object against `specs` (the attention options plus
 * `extraSpecs`): null/undefined mean no options; anything but a plain
 * object, an unknown key, or a value of the wrong type or range throws a
 * FlashAttentionError naming the option. Keys whose value is `undefined` are
 * treated as absent. Returns the options, unchanged.
 */
export function parseAttentionOptions<T extends object = FlashAttentionOptions>(
    opts: unknown, opName: string, extraSpecs: readonly OptionSpec[] = NO_SPECS): T {
  if (opts == null) {
    return {} as T;
  }
  let specs = withAttentionSpecs.get(extraSpecs);
  if (specs == null) {
    specs = [...ATTENTION_OPTION_SPECS, ...extraSpecs];
    withAttentionSpecs.set(extraSpecs, specs);
  }
  return checkOptions<T>(
      opts, opName, specs, 'opts', 'an options object ({causal: true, ...}) or undefined');
}
const NO_SPECS: readonly OptionSpec[] = [];
/** The attention options plus extra specs, by the extra list (every call asks). */
const withAttentionSpecs = new WeakMap<readonly OptionSpec[], readonly OptionSpec[]>();
/** Specs by name, by spec list. */
const specsByName = new WeakMap<readonly OptionSpec[], Map<string, OptionSpec>>();

/** An attention option's spec, for APIs that take the same value. */
export function attentionOptionSpec(
    name: keyof FlashAttentionOptions, as: string = name): OptionSpec {
  const spec = ATTENTION_OPTION_SPECS.find(s => s.name === name)!;
  return {...spec, name: as};
}

/**
 * The engine of parseAttentionOptions, for any object of named arguments
 * (the FlashMHA layer's args and config use it too): `specs` is the whole
 * list of keys allowed.
 */
export function checkOptions<T extends object>(
    opts: unknown, opName: string, specs: readonly OptionSpec[], objectName: string,
    objectExpected: string): T {
  if (opts == null || typeof opts !== 'object' || Array.isArray(opts) || opts instanceof Tensor) {
    invalidArgument(opName, objectName, objectExpected, opts);
  }
  let byName = specsByName.get(specs);
  if (byName == null) {
    byName = new Map(specs.map(s => [s.name, s]));
    specsByName.set(specs, byName);
  }
  const record = opts as Record<string, unknown>;
  for (const key of Object.keys(record)) {
    const spec = byName.get(key);
    if (spec == null) {
      const known = specs.map(s => s.name).join(', ');
      const meant = suggestOption(key, specs);
      const why = UNSUPPORTED[canonical(key)];
      const hint = meant != null ? `; did you mean '${meant}'?` : why != null ? ` (${why})` : '';
      throw new FlashAttentionError(
          opName, key, `one of ${known}`, key,
          `${opName}: unknown ${objectName === 'opts' ? 'option' : 'argument'} '${key}'${
              hint} Known: ${known}`);
    }
    const value = record[key];
    if (value !== undefined && !spec.valid(value)) {
      invalidArgument(opName, key, spec.expected, value);
    }
  }
  return opts as T;
}

/**
 * Validates the options and resolves defaults into kernel attrs. A window
 * side that cannot hide any key becomes -1 (unbounded): the left side once
 * it is >= seqK, the right side once it is >= seqQ (query 0 then already
 * sees key Sk - 1; flash_attn's threshold of Sk would, when Sq > Sk, drop a
 * right window that still hides keys). Without lengths only sides past
 * int32 are clamped (the kernels keep windows in i32).
 */
export function normalizeOptions(
    opts: FlashAttentionOptions|null|undefined, headDim: number, opName: string, seqK?: number,
    seqQ?: number): FlashAttentionAttrs {
  const o = parseAttentionOptions<FlashAttentionOptions>(opts, opName);
  const causal = o.causal ?? false;
  const softmaxScale = Math.fround(o.softmaxScale ?? 1 / Math.sqrt(headDim));
  const softcap = Math.fround(o.softcap ?? 0);
  if (softcap > 0 && !Number.isFinite(Math.fround(softmaxScale / softcap))) {
    // The kernels fold 1/softcap into the scale.
    throw new FlashAttentionError(
        opName, 'softcap', 'such that softmaxScale / softcap is finite as a float32',
        describeValue(o.softcap),
        `${opName}: softmaxScale / softcap must be finite as a float32, got ${softmaxScale} / ${
            softcap}`);
  }
  const dropoutRate = o.dropoutRate ?? 0;
  // Without dropout no kernel reads the seed: a fixed one keeps the attrs,
  // and so the kernels' uniforms, the same from call to call.
  const seed = dropoutRate > 0 ? o.seed ?? randomSeed() : 0;
  const int32Bound = 2 ** 31 - 1;
  const clamp = (w: number, bound = int32Bound) => (w >= Math.min(bound, int32Bound) ? -1 : w);
  const [left, right] = o.windowSize ?? [-1, -1];
  const windowLeft = clamp(left, seqK);
  let windowRight = clamp(right, seqQ);
  if (causal) {
    windowRight = 0;  // flash_attn: causal is a window whose right edge is 0.
  }
  const {seedLo, seedHi} = splitSeed(seed);
  return {
    softmaxScale,
    causal,
    windowLeft,
    windowRight,
    softcap,
    dropoutRate,
    seedLo,
    seedHi,
    precision: o.precision ?? 'float32',
  };
}
