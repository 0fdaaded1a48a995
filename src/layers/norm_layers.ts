/**
 * Keras-style layers over the fused norms: FusedLayerNormalization (a
 * drop-in for tf.layers.layerNormalization over the last axis, whose
 * gradient launches one kernel per tiled repeat) and RMSNormalization.
 * Called on `x`, or on `[x, residual]` to normalize `dropout(x) + residual`
 * in the same kernel; with `returnResidual` the layer outputs `[y, z]`, z
 * being the sum (the next residual stream of a pre-norm block).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type {LayerArgs} from '@tensorflow/tfjs-layers/dist/engine/topology';
import type {Initializer} from '@tensorflow/tfjs-layers/dist/initializers';
import type {Kwargs} from '@tensorflow/tfjs-layers/dist/types';
import {layerNorm, rmsNorm} from 'tfjs-flash-attention';

import {resolveSerializable, serializeObject} from './serialization';

export interface FusedNormArgs extends LayerArgs {
  /** Only the last axis (-1) is supported. */
  axis?: number;
  epsilon?: number;
  /** Learn gamma (default true). */
  scale?: boolean;
  /** Learn beta (LayerNorm only; default true). */
  center?: boolean;
  gammaInitializer?: unknown;
  betaInitializer?: unknown;
  /** Dropout on x before the residual add, when training. Default 0. */
  dropout?: number;
  /** Output `[y, z]` instead of y. Default false. */
  returnResidual?: boolean;
}

abstract class FusedNormLayer extends tfl.layers.Layer {
  readonly epsilon: number;
  readonly scale: boolean;
  readonly center: boolean;
  readonly dropout: number;
  readonly returnResidual: boolean;
  protected readonly gammaInitializer: Initializer;
  protected readonly betaInitializer: Initializer;
  protected gamma: tfl.LayerVariable|null = null;
  protected beta: tfl.LayerVariable|null = null;

  constructor(args: FusedNormArgs, private readonly rms: boolean, defaultEpsilon: number) {
    super(args);
    const name = this.getClassName();
    if (args.axis != null && args.axis !== -1) {
      throw new Error(`${name}: axis must be -1 (the last axis), got ${args.axis}`);
    }
    this.epsilon = args.epsilon ?? defaultEpsilon;
    this.scale = args.scale ?? true;
    this.center = !rms && (args.center ?? true);
    this.dropout = args.dropout ?? 0;
    if (!(this.dropout >= 0 && this.dropout < 1)) {
      throw new Error(`${name}: dropout must be in [0, 1), got ${args.dropout}`);
    }
    this.returnResidual = args.returnResidual ?? false;
    this.gammaInitializer = resolveSerializable<Initializer>(
        args.gammaInitializer ?? 'ones', 'gammaInitializer', name)!;
    this.betaInitializer =
        resolveSerializable<Initializer>(args.betaInitializer ?? 'zeros', 'betaInitializer', name)!;
  }

  override build(inputShape: tfl.Shape|tfl.Shape[]): void {
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    const dim = shape[shape.length - 1];
    if (dim == null) {
      throw new Error(`${this.getClassName()}: the last axis must be known, got shape [${shape}]`);
    }
    if (this.scale) {
      this.gamma = this.addWeight('gamma', [dim], 'float32', this.gammaInitializer);
    }
    if (this.center) {
      this.beta = this.addWeight('beta', [dim], 'float32', this.betaInitializer);
    }
    this.built = true;
  }

  override computeOutputShape(inputShape: tfl.Shape|tfl.Shape[]): tfl.Shape|tfl.Shape[] {
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    return this.returnResidual ? [shape, shape] : shape;
  }

  override call(inputs: tf.Tensor|tf.Tensor[], kwargs: Kwargs): tf.Tensor|tf.Tensor[] {
    return tf.tidy(() => {
      const [x, residual] = Array.isArray(inputs) ? inputs : [inputs];
      const dim = x.shape[x.rank - 1];
      const gamma = this.gamma?.read() ?? tf.ones([dim]);
      const training = kwargs['training'] === true;
      const opts = {
        residual,
        epsilon: this.epsilon,
        dropoutRate: training ? this.dropout : 0,
        // Only when z is used: an unused output's gradient costs an upload.
        returnResidual: this.returnResidual
      };
      return this.rms ? rmsNorm(x, gamma, opts) :
                        layerNorm(x, gamma, this.beta?.read() ?? tf.zeros([dim]), opts);
    });
  }

  override getConfig(): tf.serialization.ConfigDict {
    const config: tf.serialization.ConfigDict = {
      ...super.getConfig(),
      axis: -1,
      epsilon: this.epsilon,
      scale: this.scale,
      dropout: this.dropout,
      returnResidual: this.returnResidual,
      gammaInitializer: serializeObject(this.gammaInitializer) as unknown as
          tf.serialization.ConfigDict,
    };
    if (!this.rms) {
      config.center = this.center;
      config.betaInitializer =
          serializeObject(this.betaInitializer) as unknown as tf.serialization.ConfigDict;
    }
    return config;
  }
}

/** LayerNorm over the last axis in one fused kernel (plus residual, dropout). */
export class FusedLayerNormalization extends FusedNormLayer {
  static className = 'FusedLayerNormalization';
  constructor(args: FusedNormArgs = {}) {
    super(args, false, 1e-3);
  }
}
tf.serialization.registerClass(FusedLayerNormalization);

/** RMSNorm over the last axis in one fused kernel (plus residual, dropout). */
export class RMSNormalization extends FusedNormLayer {
  static className = 'RMSNormalization';
  constructor(args: FusedNormArgs = {}) {
    super(args, true, 1e-6);
  }
}
tf.serialization.registerClass(RMSNormalization);

export function fusedLayerNormalization(args?: FusedNormArgs): FusedLayerNormalization {
  return new FusedLayerNormalization(args);
}

export function rmsNormalization(args?: FusedNormArgs): RMSNormalization {
  return new RMSNormalization(args);
}
