/**
 * FlashMHA: multi-head attention as a tf.layers layer whose attention is
 * the flashAttention op (fused kernel where the backend has one), with the
 * arguments of flash_attn's `MHA` in tfjs naming.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type {Constraint, ConstraintIdentifier} from '@tensorflow/tfjs-layers/dist/constraints';
import type {LayerArgs} from '@tensorflow/tfjs-layers/dist/engine/topology';
import type {Initializer, InitializerIdentifier} from '@tensorflow/tfjs-layers/dist/initializers';
import type {Shape} from '@tensorflow/tfjs-layers/dist/keras_format/common';
import type {Regularizer, RegularizerIdentifier} from '@tensorflow/tfjs-layers/dist/regularizers';
import type {Kwargs} from '@tensorflow/tfjs-layers/dist/types';
import {attentionOptionSpec, checkOptions, FlashAttentionError, flashAttention, KVCache, MAX_HEAD_DIM, paddingMaskLengths} from 'tfjs-flash-attention';
import type {OptionSpec} from 'tfjs-flash-attention';

import {alibiSlopes} from './alibi';
import {maskedAttention} from './masked_attention';
import {applyRotary, RotaryTables} from './rotary';
import {resolveSerializable, serializeObject} from './serialization';

type InitializerArg = InitializerIdentifier|Initializer|{className: string, config: object};
type RegularizerArg = RegularizerIdentifier|Regularizer|{className: string, config: object};
type ConstraintArg = ConstraintIdentifier|Constraint|{className: string, config: object};

export interface FlashMHAArgs extends LayerArgs {
  /** Model width: input and output features (input `[B, S, embedDim]`). */
  embedDim: number;
  /** Query heads. */
  numHeads: number;
  /** Key/value heads (GQA/MQA); divides numHeads. Default numHeads. */
  numHeadsKV?: number;
  /** Features per head. Default embedDim / numHeads. */
  headDim?: number;
  /** Attention dropout rate, applied only when training. Default 0. */
  dropout?: number;
  /** Causal self-attention (bottom-right aligned when Sq != Sk). */
  causal?: boolean;
  /** Default 1 / sqrt(headDim). */
  softmaxScale?: number;
  /** `[left, right]` local attention; -1 = unbounded. Default [-1, -1]. */
  windowSize?: [number, number];
  /** Score soft-capping; 0 = off. */
  softcap?: number;
  /**
   * Matrix-product precision of the tensor-core kernels
   * (docs/tensor_cores.md): 'float32' (default, float32-accurate) or the
   * faster 'float16'. Other kernels compute in float32 either way.
   */
  precision?: 'float32'|'float16';
  /** ALiBi position biases with the standard per-head slopes. */
  useAlibi?: boolean;
  /** Biases of the q/k/v projections. Default true. */
  qkvProjBias?: boolean;
  /** Bias of the output projection. Default true. */
  outProjBias?: boolean;
  /** Features of each q/k head rotated by RoPE (even, <= headDim); 0 = off. */
  rotaryEmbDim?: number;
  /** RoPE base. Default 10000. */
  rotaryEmbBase?: number;
  /** RoPE on pairs (0,1),(2,3)... (GPT-J) instead of halves (GPT-NeoX). */
  rotaryEmbInterleaved?: boolean;
  /** Called with `[x, xKV]`: queries from x, keys and values from xKV. */
  crossAttention?: boolean;
  kernelInitializer?: InitializerArg;
  biasInitializer?: InitializerArg;
  kernelRegularizer?: RegularizerArg;
  biasRegularizer?: RegularizerArg;
  kernelConstraint?: ConstraintArg;
  biasConstraint?: ConstraintArg;
}

/** What `call` takes besides `training` and tfjs's propagated `mask`. */
export interface FlashMHACallKwargs {
  /** `[B, Sk]` bool or 0/1, true = the key may be attended to. */
  keyPaddingMask?: tf.Tensor;
  training?: boolean;
}

function positiveInteger(value: unknown, argName: string, max = Infinity): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > max) {
    throw new FlashAttentionError(
        'FlashMHA', argName, max === Infinity ? 'a positive integer' : `an integer in [1, ${max}]`,
        String(value));
  }
  return value;
}

const anyValue = () => true;
const isBoolean = (v: unknown) => typeof v === 'boolean';
const integerAtLeast = (min: number) => (v: unknown) => Number.isInteger(v) && (v as number) >= min;
const serializable = (v: unknown) => typeof v === 'string' || (v != null && typeof v === 'object');

/**
 * Every key FlashMHA's args (and saved config) may hold. The attention
 * settings use the op's own specs, so the layer accepts and rejects exactly
 * what flashAttention does; tfjs-layers checks its own LayerArgs.
 */
const FLASH_MHA_ARG_SPECS: OptionSpec[] = [
  {
    name: 'embedDim',
    expected: 'a positive integer',
    valid: integerAtLeast(1),
    aliases: ['embed_dim', 'dModel', 'hiddenSize', 'units']
  },
  {
    name: 'numHeads',
    expected: 'a positive integer',
    valid: integerAtLeast(1),
    aliases: ['num_heads', 'nHeads', 'heads']
  },
  {
    name: 'numHeadsKV',
    expected: 'a positive integer',
    valid: integerAtLeast(1),
    aliases: ['num_heads_kv', 'numKVHeads', 'num_key_value_heads']
  },
  {
    name: 'headDim',
    expected: `an integer in [1, ${MAX_HEAD_DIM}]`,
    valid: v => integerAtLeast(1)(v) && (v as number) <= MAX_HEAD_DIM,
    aliases: ['head_dim', 'keyDim', 'key_dim']
  },
  attentionOptionSpec('dropoutRate', 'dropout'),
  attentionOptionSpec('causal'),
  // null: a saved config of a layer with the default scale.
  {
    ...attentionOptionSpec('softmaxScale'),
    valid: v => v === null || attentionOptionSpec('softmaxScale').valid(v)
  },
  attentionOptionSpec('windowSize'),
  attentionOptionSpec('softcap'),
  attentionOptionSpec('precision'),
  {
    name: 'useAlibi',
    expected: 'a boolean',
    valid: isBoolean,
    aliases: ['use_alibi', 'alibi', 'alibiSlopes', 'alibi_slopes']
  },
  {
    name: 'qkvProjBias',
    expected: 'a boolean',
    valid: isBoolean,
    aliases: ['qkv_proj_bias', 'useBias', 'use_bias', 'bias']
  },
  {name: 'outProjBias', expected: 'a boolean', valid: isBoolean, aliases: ['out_proj_bias']},
  {
    name: 'rotaryEmbDim',
    expected: 'an even integer in [0, headDim]',
    valid: integerAtLeast(0),
    aliases: ['rotary_emb_dim', 'rotaryDim']
  },
  {
    name: 'rotaryEmbBase',
    expected: 'a finite number > 0',
    valid: v => typeof v === 'number' && v > 0 && Number.isFinite(Math.fround(v)),
    aliases: ['rotary_emb_base', 'ropeTheta', 'rope_theta']
  },
  {
    name: 'rotaryEmbInterleaved',
    expected: 'a boolean',
    valid: isBoolean,
    aliases: ['rotary_emb_interleaved']
  },
  {
    name: 'crossAttention',
    expected: 'a boolean',
    valid: isBoolean,
    aliases: ['cross_attn', 'cross_attention', 'crossAttn']
  },
  ...['kernelInitializer', 'biasInitializer', 'kernelRegularizer', 'biasRegularizer',
      'kernelConstraint', 'biasConstraint']
      .map(name => ({
             name,
             expected: 'an identifier, an instance or a {className, config}',
             valid: (v: unknown) => v === null || serializable(v),
           })),
  // tfjs-layers' LayerArgs, checked by tfjs-layers.
  ...['inputShape', 'batchInputShape', 'batchSize', 'dtype', 'name', 'trainable', 'weights',
      'inputDType']
      .map(name => ({name, expected: 'a LayerArgs value', valid: anyValue})),
];

/** Checks every key and value of FlashMHA's args before anything is built. */
function checkArgs(args: FlashMHAArgs): FlashMHAArgs {
  return checkOptions<FlashMHAArgs>(
      args, 'FlashMHA', FLASH_MHA_ARG_SPECS, 'args', 'an object with embedDim and numHeads');
}

interface Projection {
  kernel: tfl.LayerVariable;
  bias: tfl.LayerVariable|null;
}

export class FlashMHA extends tfl.layers.Layer {
  static className = 'FlashMHA';

  readonly embedDim: number;
  readonly numHeads: number;
  readonly numHeadsKV: number;
  readonly headDim: number;
  readonly dropout: number;
  readonly causal: boolean;
  readonly softmaxScale: number|undefined;
  readonly windowSize: [number, number];
  readonly softcap: number;
  readonly precision: 'float32'|'float16';
  readonly useAlibi: boolean;
  readonly qkvProjBias: boolean;
  readonly outProjBias: boolean;
  readonly rotaryEmbDim: number;
  /** RoPE's cos/sin tables, kept between calls; released by dispose(). */
  private rotaryTables: RotaryTables|null = null;
  readonly rotaryEmbBase: number;
  readonly rotaryEmbInterleaved: boolean;
  readonly crossAttention: boolean;
  readonly kernelInitializer: Initializer;
  readonly biasInitializer: Initializer;
  readonly kernelRegularizer: Regularizer|null;
  readonly biasRegularizer: Regularizer|null;
  readonly kernelConstraint: Constraint|null;
  readonly biasConstraint: Constraint|null;

  /** Self-attention: packed [E, (H + 2 Hk) D]. Cross: q [E, H D] and kv [Ekv, 2 Hk D]. */
  protected qkvProj: Projection|null = null;
  protected qProj: Projection|null = null;
  protected kvProj: Projection|null = null;
  protected outProj: Projection|null = null;

  constructor(args: FlashMHAArgs) {
    super(checkArgs(args));
    this.embedDim = positiveInteger(args.embedDim, 'embedDim');
    this.numHeads = positiveInteger(args.numHeads, 'numHeads');
    this.numHeadsKV = positiveInteger(args.numHeadsKV ?? this.numHeads, 'numHeadsKV');
    if (this.numHeads % this.numHeadsKV !== 0) {
      throw new FlashAttentionError(
          'FlashMHA', 'numHeadsKV', `a divisor of numHeads = ${this.numHeads}`,
          String(this.numHeadsKV));
    }
    if (args.headDim == null && this.embedDim % this.numHeads !== 0) {
      throw new FlashAttentionError(
          'FlashMHA', 'embedDim',
          `a multiple of numHeads = ${this.numHeads} when headDim is not given`,
          String(this.embedDim));
    }
    this.headDim =
        positiveInteger(args.headDim ?? this.embedDim / this.numHeads, 'headDim', MAX_HEAD_DIM);
    // Values checked by checkArgs with the op's own specs.
    this.dropout = args.dropout ?? 0;
    this.causal = args.causal ?? false;
    this.softmaxScale = args.softmaxScale ?? undefined;
    const window = args.windowSize ?? [-1, -1];
    this.windowSize = [window[0], window[1]];
    this.softcap = args.softcap ?? 0;
    this.precision = args.precision ?? 'float32';
    this.useAlibi = args.useAlibi ?? false;
    this.qkvProjBias = args.qkvProjBias ?? true;
    this.outProjBias = args.outProjBias ?? true;
    this.rotaryEmbDim = args.rotaryEmbDim ?? 0;
    if (!Number.isInteger(this.rotaryEmbDim) || this.rotaryEmbDim < 0 ||
        this.rotaryEmbDim % 2 !== 0 || this.rotaryEmbDim > this.headDim) {
      throw new FlashAttentionError(
          'FlashMHA', 'rotaryEmbDim', `an even integer in [0, headDim = ${this.headDim}]`,
          String(args.rotaryEmbDim));
    }
    this.rotaryEmbBase = args.rotaryEmbBase ?? 10000;
    this.rotaryEmbInterleaved = args.rotaryEmbInterleaved ?? false;
    this.crossAttention = args.crossAttention ?? false;
    const name = `FlashMHA '${this.name}'`;
    this.kernelInitializer = resolveSerializable<Initializer>(
        args.kernelInitializer ?? 'glorotUniform', 'kernelInitializer', name)!;
    this.biasInitializer =
        resolveSerializable<Initializer>(args.biasInitializer ?? 'zeros', 'biasInitializer', name)!;
    this.kernelRegularizer =
        resolveSerializable<Regularizer>(args.kernelRegularizer, 'kernelRegularizer', name);
    this.biasRegularizer =
        resolveSerializable<Regularizer>(args.biasRegularizer, 'biasRegularizer', name);
    this.kernelConstraint =
        resolveSerializable<Constraint>(args.kernelConstraint, 'kernelConstraint', name);
    this.biasConstraint =
        resolveSerializable<Constraint>(args.biasConstraint, 'biasConstraint', name);
    this.supportsMasking = true;
  }

  /** The input shapes: `[x]` or, with crossAttention, `[x, xKV]`. */
  private inputShapes(inputShape: Shape|Shape[]): Shape[] {
    const nested = Array.isArray(inputShape[0]);
    const shapes = (nested ? inputShape : [inputShape]) as Shape[];
    const expected = this.crossAttention ? 2 : 1;
    if (shapes.length !== expected) {
      throw new Error(`FlashMHA: expected ${
          this.crossAttention ? 'two inputs [x, xKV] (crossAttention)' :
                                'one input x'}, got ${shapes.length} inputs`);
    }
    shapes.forEach((shape, i) => {
      const what = i === 0 ? 'x' : 'xKV';
      if (shape.length !== 3) {
        throw new Error(`FlashMHA: ${what} must have rank 3 [batch, seq, features], got shape ${
            JSON.stringify(shape)}`);
      }
      if (i === 0 && shape[2] !== this.embedDim) {
        throw new Error(`FlashMHA: the last dim of x must be embedDim = ${
            this.embedDim}, got shape ${JSON.stringify(shape)}`);
      }
      if (shape[2] == null) {
        throw new Error(
            `FlashMHA: the last dim of ${what} must be known, got shape ${JSON.stringify(shape)}`);
      }
    });
    return shapes;
  }

  private projection(name: string, inDim: number, outDim: number, bias: boolean): Projection {
    const kernel = this.addWeight(
        `${name}/kernel`, [inDim, outDim], 'float32', this.kernelInitializer,
        this.kernelRegularizer ?? undefined, true, this.kernelConstraint ?? undefined);
    const biasVar = bias ?
        this.addWeight(
            `${name}/bias`, [outDim], 'float32', this.biasInitializer,
            this.biasRegularizer ?? undefined, true, this.biasConstraint ?? undefined) :
        null;
    return {kernel, bias: biasVar};
  }

  override build(inputShape: Shape|Shape[]): void {
    const shapes = this.inputShapes(inputShape);
    const {embedDim, numHeads, numHeadsKV, headDim} = this;
    if (this.crossAttention) {
      this.qProj = this.projection('q', embedDim, numHeads * headDim, this.qkvProjBias);
      this.kvProj =
          this.projection('kv', shapes[1][2]!, 2 * numHeadsKV * headDim, this.qkvProjBias);
    } else {
      this.qkvProj =
          this.projection('qkv', embedDim, (numHeads + 2 * numHeadsKV) * headDim, this.qkvProjBias);
    }
    this.outProj = this.projection('out', numHeads * headDim, embedDim, this.outProjBias);
    this.built = true;
  }

  override computeOutputShape(inputShape: Shape|Shape[]): Shape {
    const [x] = this.inputShapes(inputShape);
    return [x[0], x[1], this.embedDim];
  }

  override computeMask(inputs: tf.Tensor|tf.Tensor[], mask?: tf.Tensor|tf.Tensor[]): tf.Tensor
      |tf.Tensor[] {
    // The output keeps the queries' positions, hence their mask.
    return (Array.isArray(mask) ? mask[0] : mask) as tf.Tensor;
  }

  /** `x [B, S, In]` times a projection -> `[B, S, Out]`. */
  private project(x: tf.Tensor, proj: Projection): tf.Tensor3D {
    const [batch, seq, inDim] = x.shape as [number, number, number];
    const kernel = proj.kernel.read();
    let y = tf.matMul(tf.reshape(x, [batch * seq, inDim]), kernel);
    if (proj.bias != null) {
      y = tf.add(y, proj.bias.read());
    }
    return tf.reshape(y, [batch, seq, kernel.shape[1]!]);
  }

  /**
   * `project` as one fused matMul with the bias added in its kernel: one
   * kernel instead of two per projection and token. Inference only (the
   * training path keeps `project`, whose gradient counts are pinned).
   */
  private projectFused(x: tf.Tensor, proj: Projection): tf.Tensor3D {
    const [batch, seq, inDim] = x.shape as [number, number, number];
    const kernel = proj.kernel.read() as tf.Tensor2D;
    const y = tf.fused.matMul(
        {a: tf.reshape(x, [batch * seq, inDim]), b: kernel, bias: proj.bias?.read()});
    return tf.reshape(y, [batch, seq, kernel.shape[1]]);
  }

  /** The key padding mask of a call: kwargs.keyPaddingMask, else tfjs's propagated mask. */
  private keyMaskOf(kwargs: Kwargs): tf.Tensor|null {
    const explicit = kwargs['keyPaddingMask'] as tf.Tensor | undefined;
    if (explicit != null) {
      return explicit;
    }
    const propagated = (kwargs['mask'] as tf.Tensor | tf.Tensor[] | undefined) ?? null;
    if (Array.isArray(propagated)) {
      // One mask per input: the keys come from the last.
      return propagated[propagated.length - 1] ?? null;
    }
    // A single propagated mask belongs to x: the keys' only with self-attention
    // (tfjs's executor may pass just the first input's mask to a cross-attention).
    return this.crossAttention ? null : propagated;
  }

  override call(inputs: tf.Tensor|tf.Tensor[], kwargs: Kwargs): tf.Tensor {
    return tf.tidy(() => {
      const list = Array.isArray(inputs) ? inputs : [inputs];
      this.inputShapes(list.map(t => t.shape));
      const x = list[0];
      const [batch, seqQ] = x.shape;
      const {numHeads: heads, numHeadsKV: headsKV, headDim} = this;
      let q: tf.Tensor4D;
      let k: tf.Tensor4D;
      let v: tf.Tensor4D;
      if (this.crossAttention) {
        const xKV = list[1];
        const seqK = xKV.shape[1]!;
        q = tf.reshape(this.project(x, this.qProj!), [batch, seqQ, heads, headDim]);
        const kv = tf.reshape(this.project(xKV, this.kvProj!), [batch, seqK, 2, headsKV, headDim]);
        [k, v] = tf.unstack(kv, 2) as tf.Tensor4D[];
      } else {
        const qkv = this.project(x, this.qkvProj!);
        const [qFlat, kFlat, vFlat] =
            tf.split(qkv, [heads * headDim, headsKV * headDim, headsKV * headDim], 2);
        q = tf.reshape(qFlat, [batch, seqQ, heads, headDim]);
        k = tf.reshape(kFlat, [batch, seqQ, headsKV, headDim]);
        v = tf.reshape(vFlat, [batch, seqQ, headsKV, headDim]);
      }
      if (this.rotaryEmbDim > 0) {
        this.rotaryTables ??= new RotaryTables(this.rotaryEmbDim, this.rotaryEmbBase);
        q = applyRotary(
            q, this.rotaryEmbDim, this.rotaryEmbBase, this.rotaryEmbInterleaved, this.rotaryTables);
        k = applyRotary(
            k, this.rotaryEmbDim, this.rotaryEmbBase, this.rotaryEmbInterleaved, this.rotaryTables);
      }
      const keyMask = this.keyMaskOf(kwargs);
      if (keyMask != null &&
          (keyMask.rank !== 2 || keyMask.shape[0] !== batch || keyMask.shape[1] !== k.shape[1])) {
        throw new Error(`FlashMHA: keyPaddingMask must have shape [batch, seqK] = [${batch}, ${
            k.shape[1]}], got [${keyMask.shape.join(', ')}]`);
      }
      const training = kwargs['training'] === true;
      const out = this.attend(q, k, v, keyMask, training);
      return this.project(tf.reshape(out, [batch, seqQ, heads * headDim]), this.outProj!);
    });
  }

  /**
   * A KV cache for `decode` with this layer: `maxSeqLen` tokens of `batch`
   * sequences. The caller owns it (dispose() it when generation ends).
   */
  createCache(batch: number, maxSeqLen: number): KVCache {
    return new KVCache({batch, maxSeqLen, headsKV: this.numHeadsKV, headDim: this.headDim});
  }

  /**
   * Incremental decoding: `x [B, Snew, embedDim]` holds the next tokens of
   * each sequence; their keys and values are appended to `cache` (made by
   * createCache) and the result equals rows `L .. L + Snew - 1` of `call`
   * on the whole sequence so far (L = tokens cached before). Causal
   * self-attention only (a non-causal layer's earlier outputs depend on
   * later tokens); inference only (no dropout, no key padding mask).
   */
  decode(x: tf.Tensor, cache: KVCache): tf.Tensor3D {
    if (!this.built) {
      throw new Error(
          'FlashMHA.decode: the layer is not built (apply it to an input or a model first)');
    }
    if (this.crossAttention || !this.causal) {
      throw new Error(`FlashMHA.decode: needs causal self-attention, got causal=${
          this.causal}, crossAttention=${this.crossAttention}`);
    }
    if (!(cache instanceof KVCache) || cache.headsKV !== this.numHeadsKV ||
        cache.headDim !== this.headDim) {
      throw new Error(`FlashMHA.decode: cache must be a KVCache from createCache (Hk = ${
          this.numHeadsKV}, D = ${this.headDim})`);
    }
    if (x.rank !== 3 || x.shape[0] !== cache.batch || x.shape[2] !== this.embedDim) {
      throw new Error(`FlashMHA.decode: x must have shape [batch = ${
          cache.batch}, Snew, embedDim = ${this.embedDim}], got [${x.shape.join(', ')}]`);
    }
    return tf.tidy(() => {
      const [batch, seqNew] = x.shape;
      const {numHeads: heads, numHeadsKV: headsKV, headDim} = this;
      let rotary = {};
      if (this.rotaryEmbDim > 0) {
        // The same tables as `call`, read at each token's position.
        this.rotaryTables ??= new RotaryTables(this.rotaryEmbDim, this.rotaryEmbBase);
        const [rotaryCos, rotarySin] = this.rotaryTables.covering(cache.maxSeqLen);
        rotary = {rotaryCos, rotarySin, rotaryInterleaved: this.rotaryEmbInterleaved};
      }
      // Kept with the cache: no upload per step.
      const slopes =
          this.useAlibi ? cache.constant('alibiSlopes', () => this.alibiSlopesTensor()!) : null;
      const opts = {
        causal: true,
        softmaxScale: this.softmaxScale,
        windowSize: this.windowSize,
        softcap: this.softcap,
        ...(slopes == null ? {} : {alibiSlopes: slopes}),
        ...rotary,
      };
      // One kernel projects, rotates and appends where there is one, and
      // one merges attention's splits and projects the result; else the
      // projection's heads stay packed and the cache takes q, k and v from
      // them (on webgpu without a split).
      const [proj, outProj] = [this.qkvProj!, this.outProj!];
      const weights = (p: Projection) => ({
        w: p.kernel.read() as tf.Tensor2D,
        bias: (p.bias?.read() ?? null) as tf.Tensor1D | null,
      });
      const qkv = weights(proj);
      const fused = cache.attendProjected(
          tf.reshape(x, [batch * seqNew, this.embedDim]) as tf.Tensor2D, qkv.w, qkv.bias, heads,
          opts, weights(outProj));
      if (fused != null && 'y' in fused) {
        return tf.reshape(fused.y, [batch, seqNew, this.embedDim]);
      }
      const out = fused?.out ??
          cache.attendPacked(
              tf.reshape(
                  this.projectFused(x, proj), [batch, seqNew, heads + 2 * headsKV, headDim]) as
                  tf.Tensor4D,
              heads, opts);
      return this.projectFused(tf.reshape(out, [batch, seqNew, heads * headDim]), outProj);
    });
  }

  override dispose(): ReturnType<tfl.layers.Layer['dispose']> {
    const result = super.dispose();
    if (result.refCountAfterDispose === 0) {
      this.rotaryTables?.dispose();
      this.rotaryTables = null;
    }
    return result;
  }

  /** ALiBi slopes `[H]` of this layer, or null. */
  protected alibiSlopesTensor(): tf.Tensor1D|null {
    return this.useAlibi ? tf.tensor1d(alibiSlopes(this.numHeads)) : null;
  }

  /**
   * The attention itself: q `[B, Sq, H, D]`, k and v `[B, Sk, Hk, D]` ->
   * `[B, Sq, H, D]`. flashAttention; a key padding mask (each row real
   * keys, then padding) goes to it as keyPaddingMask, whose keys the fused
   * kernels skip by tile (causal, window and ALiBi keep their padded
   * diagonal). Any other key mask takes the masked composed path when its
   * values are in host memory; a mask that lives on the GPU is not read
   * back and is taken as a padding mask (docs/varlen.md).
   */
  protected attend(
      q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D, keyMask: tf.Tensor|null,
      training: boolean): tf.Tensor4D {
    const common = {
      causal: this.causal,
      softmaxScale: this.softmaxScale,
      windowSize: this.windowSize,
      softcap: this.softcap,
      dropoutRate: training ? this.dropout : 0,
      precision: this.precision,
    };
    const slopes = this.alibiSlopesTensor();
    if (keyMask != null) {
      if (paddingMaskLengths(keyMask) == null) {
        return maskedAttention(q, k, v, {...common, alibiSlopes: slopes, keyMask});
      }
      const keyPaddingMask = keyMask.dtype === 'bool' ? keyMask : tf.cast(keyMask, 'bool');
      return flashAttention(
          q, k, v,
          slopes == null ? {...common, keyPaddingMask} :
                           {...common, keyPaddingMask, alibiSlopes: slopes});
    }
    return flashAttention(q, k, v, slopes == null ? common : {...common, alibiSlopes: slopes});
  }

  override getConfig(): tf.serialization.ConfigDict {
    const config: tf.serialization.ConfigDict = {
      embedDim: this.embedDim,
      numHeads: this.numHeads,
      numHeadsKV: this.numHeadsKV,
      headDim: this.headDim,
      dropout: this.dropout,
      causal: this.causal,
      softmaxScale: this.softmaxScale ?? null,
      windowSize: this.windowSize,
      softcap: this.softcap,
      precision: this.precision,
      useAlibi: this.useAlibi,
      qkvProjBias: this.qkvProjBias,
      outProjBias: this.outProjBias,
      rotaryEmbDim: this.rotaryEmbDim,
      rotaryEmbBase: this.rotaryEmbBase,
      rotaryEmbInterleaved: this.rotaryEmbInterleaved,
      crossAttention: this.crossAttention,
      kernelInitializer: serializeObject(this.kernelInitializer),
      biasInitializer: serializeObject(this.biasInitializer),
      kernelRegularizer: serializeObject(this.kernelRegularizer),
      biasRegularizer: serializeObject(this.biasRegularizer),
      kernelConstraint: serializeObject(this.kernelConstraint),
      biasConstraint: serializeObject(this.biasConstraint),
    };
    return {...super.getConfig(), ...config};
  }

  /**
   * Saved configs go through snake case and back, which turns numHeadsKV
   * into numHeadsKv: accept that spelling when loading.
   */
  static override fromConfig<T extends tf.serialization.Serializable>(
      cls: tf.serialization.SerializableConstructor<T>, config: tf.serialization.ConfigDict): T {
    // tfjs-layers' deserializer adds `customObjects` to every nested
    // config it builds from a {className, config}: not a layer argument.
    const {numHeadsKv, customObjects: _customObjects, ...rest} = config;
    return new cls({...rest, numHeadsKV: rest['numHeadsKV'] ?? numHeadsKv});
  }
}
tf.serialization.registerClass(FlashMHA);

/** Creates a FlashMHA layer (`tf.layers.dense`-style factory). */
export function flashMHA(args: FlashMHAArgs): FlashMHA {
  return new FlashMHA(args);
}
