/**
 * Fused AdamW and Adam: a tf.train-style optimizer whose webgpu step is one
 * compute pass, in place, with nothing uploaded per step (see
 * kernels/webgpu/fused_adamw.ts), and whose step on every other backend is
 * the same math in composed tf ops (the reference).
 *
 * Weight decay is decoupled (Loshchilov & Hutter): p -= lr * wd * p, next to
 * the Adam step, not added to the gradient. Optional clipping scales all
 * gradients by clipNorm / max(globalNorm, clipNorm) before the moments.
 *
 * Serializable like tfjs's AdamOptimizer: getConfig/fromConfig, and
 * getWeights/setWeights with [iterations, ...first moments, ...second
 * moments], named `${variable}/m` and `${variable}/v`.
 */
import * as tf from '@tensorflow/tfjs-core';

import {AdamWWebGPUState} from '../../kernels/webgpu/fused_adamw';

export interface FusedAdamWArgs {
  /** Default 0.001. */
  learningRate?: number;
  /** Default 0.9. */
  beta1?: number;
  /** Default 0.999. */
  beta2?: number;
  /** Default 1e-7 (tfjs's float32 epsilon, as tf.train.adam). */
  epsilon?: number;
  /** Decoupled weight decay; default 0.01 (fusedAdam: 0). */
  weightDecay?: number;
  /** Clip gradients by their global norm; null or 0: no clipping. */
  clipNorm?: number|null;
}

/** `auto` (fused kernels on webgpu), `fused` (webgpu only) or `reference`. */
export const FUSED_ADAMW_IMPL = 'FUSED_ADAMW_IMPL';
export type FusedAdamWImpl = 'auto'|'fused'|'reference';
const IMPLS: readonly FusedAdamWImpl[] = ['auto', 'fused', 'reference'];

tf.env().registerFlag(FUSED_ADAMW_IMPL, () => {
  const env = typeof process !== 'undefined' ? process.env : undefined;
  return env?.[FUSED_ADAMW_IMPL] || 'auto';
});

function checkNumber(
    name: string, value: unknown, ok: (x: number) => boolean, expected: string): void {
  if (typeof value !== 'number' || !ok(value)) {
    throw new Error(`fusedAdamW: ${name} must be ${expected}, got ${JSON.stringify(value)}`);
  }
}

/** tfjs-core's NamedTensor (not exported from its index). */
interface NamedTensor {
  name: string;
  tensor: tf.Tensor;
}

interface Moments {
  m: tf.Variable;
  v: tf.Variable;
}

export class FusedAdamW extends tf.Optimizer {
  /** @nocollapse */
  static get className(): string {
    return 'FusedAdamW';
  }

  learningRate: number;
  beta1: number;
  beta2: number;
  epsilon: number;
  weightDecay: number;
  clipNorm: number|null;

  /** Moments by variable name, in the order first seen. */
  private moments = new Map<string, Moments>();
  /**
   * Moments from setWeights not yet matched by name, in saved order: a
   * reloaded model's variables may have new (deduplicated) names, so, as
   * tfjs's AdamOptimizer does, the i-th gradient then takes the i-th.
   */
  private unclaimed: Array<{name: string, moments: Moments}|null> = [];
  private gpu: AdamWWebGPUState|null = null;

  constructor(args: FusedAdamWArgs = {}) {
    super();
    this.learningRate = args.learningRate ?? 0.001;
    this.beta1 = args.beta1 ?? 0.9;
    this.beta2 = args.beta2 ?? 0.999;
    this.epsilon = args.epsilon ?? 1e-7;
    this.weightDecay = args.weightDecay ?? 0.01;
    this.clipNorm = args.clipNorm ?? null;
    this.checkHyperparameters();
  }

  private checkHyperparameters(): void {
    checkNumber(
        'learningRate', this.learningRate, x => Number.isFinite(x) && x >= 0,
        'a finite number >= 0');
    checkNumber('beta1', this.beta1, x => x >= 0 && x < 1, 'in [0, 1)');
    checkNumber('beta2', this.beta2, x => x >= 0 && x < 1, 'in [0, 1)');
    checkNumber('epsilon', this.epsilon, x => Number.isFinite(x) && x > 0, 'a finite number > 0');
    checkNumber(
        'weightDecay', this.weightDecay, x => Number.isFinite(x) && x >= 0, 'a finite number >= 0');
    if (this.clipNorm != null) {
      checkNumber(
          'clipNorm', this.clipNorm, x => Number.isFinite(x) && x >= 0,
          'null or a finite number >= 0');
    }
  }

  /** Which implementation a step takes on the active backend. */
  private useFused(): boolean {
    const impl = tf.env().get(FUSED_ADAMW_IMPL) as FusedAdamWImpl;
    if (!IMPLS.includes(impl)) {
      throw new Error(
          `${FUSED_ADAMW_IMPL} must be one of ${IMPLS.join(', ')}, got ${JSON.stringify(impl)}`);
    }
    const onWebGPU = tf.getBackend() === 'webgpu';
    if (impl === 'fused' && !onWebGPU) {
      throw new Error(`${FUSED_ADAMW_IMPL}=fused needs the webgpu backend, got ${tf.getBackend()}`);
    }
    return impl !== 'reference' && onWebGPU;
  }

  private momentsOf(name: string, value: tf.Variable, index: number): Moments {
    let moments = this.moments.get(name);
    if (moments != null && this.unclaimed.length > 0) {
      const byName = this.unclaimed.findIndex(u => u?.name === name);
      if (byName >= 0) {
        this.unclaimed[byName] = null;
      }
    }
    const saved = this.unclaimed[index];
    if (moments == null && saved != null &&
        tf.util.arraysEqual(saved.moments.m.shape, value.shape)) {
      this.moments.delete(saved.name);
      this.unclaimed[index] = null;
      moments = saved.moments;
      this.moments.set(name, moments);
    }
    if (moments == null) {
      moments = tf.tidy(() => ({
                          m: tf.zerosLike(value).variable(false),
                          v: tf.zerosLike(value).variable(false),
                        }));
      this.moments.set(name, moments);
    }
    return moments;
  }

  applyGradients(variableGradients: tf.NamedTensorMap|NamedTensor[]): void {
    this.checkHyperparameters();
    const pairs: Array<{name: string, grad: tf.Tensor}> = Array.isArray(variableGradients) ?
        variableGradients.map(v => ({name: v.name, grad: v.tensor})) :
        Object.keys(variableGradients).map(name => ({name, grad: variableGradients[name]}));
    const slots: Array<{name: string, param: tf.Variable, grad: tf.Tensor}&Moments> = [];
    for (const [index, {name, grad}] of pairs.entries()) {
      if (grad == null) {
        continue;
      }
      const param = tf.engine().registeredVariables[name];
      if (param == null) {
        throw new Error(`fusedAdamW: no variable named '${name}' is registered`);
      }
      if (param.dtype !== 'float32' || grad.dtype !== 'float32') {
        throw new Error(`fusedAdamW: variable '${name}' and its gradient must be float32, got ${
            param.dtype} and ${grad.dtype}`);
      }
      if (!tf.util.arraysEqual(param.shape, grad.shape)) {
        throw new Error(`fusedAdamW: the gradient of '${name}' must have shape [${
            param.shape}], got [${grad.shape}]`);
      }
      if (param.size === 0) {
        continue;
      }
      slots.push({name, param, grad, ...this.momentsOf(name, param, index)});
    }
    if (slots.length > 0) {
      if (this.useFused()) {
        this.fusedStep(slots);
      } else {
        this.referenceStep(slots);
      }
    }
    this.incrementIterations();
  }

  /**
   * tf.variableGrads, except that backprop starts from a 1 made on the
   * device (tf.fill is a kernel): tfjs seeds it with ones() made on the
   * host, an upload every step.
   */
  override computeGradients(f: () => tf.Scalar, varList?: tf.Variable[]):
      {value: tf.Scalar, grads: tf.NamedTensorMap} {
    const all = varList ?? Object.values(tf.engine().registeredVariables);
    const trainable = all.filter(v => v.trainable);
    if (trainable.length === 0) {
      throw new Error(`fusedAdamW: no trainable variables among the ${all.length} given`);
    }
    const seed = tf.fill([], 1);
    const checked = () => {
      const value = f();
      if (!(value instanceof tf.Tensor) || value.rank !== 0) {
        throw new Error(`fusedAdamW: the loss function must return a scalar, got ${
            value instanceof tf.Tensor ? `shape [${value.shape}]` : typeof value}`);
      }
      return value;
    };
    let result: {value: tf.Tensor, grads: tf.Tensor[]}|null = null;
    try {
      result = tf.engine().gradients(checked, trainable, seed, true);
    } finally {
      // The loss may be a variable itself, whose gradient is the seed.
      if (!result?.grads.includes(seed)) {
        seed.dispose();
      }
    }
    const grads: tf.NamedTensorMap = {};
    trainable.forEach((v, i) => {
      if (result.grads[i] != null) {
        grads[v.name] = result.grads[i];
      }
    });
    if (Object.keys(grads).length === 0) {
      throw new Error('fusedAdamW: the loss does not depend on any of the trainable variables');
    }
    return {value: result.value as tf.Scalar, grads};
  }

  private hyperparameters() {
    return {
      learningRate: this.learningRate,
      beta1: this.beta1,
      beta2: this.beta2,
      epsilon: this.epsilon,
      weightDecay: this.weightDecay,
      clipNorm: this.clipNorm
    };
  }

  private fusedStep(slots: Array<{param: tf.Variable, grad: tf.Tensor}&Moments>): void {
    const backend = tf.backend();
    if (this.gpu != null && this.gpu.backend !== (backend as unknown)) {
      this.gpu.dispose();
      this.gpu = null;
    }
    if (this.gpu == null) {
      this.gpu = new AdamWWebGPUState(backend, this.iterations, this.beta1, this.beta2);
    }
    // The update writes in place: a variable sharing its data with another
    // tensor (tf.variable(t), assign(t), setWeights) gets its own copy first.
    for (const slot of slots) {
      for (const variable of [slot.param, slot.m, slot.v]) {
        if (backend.refCount(variable.dataId) > 1) {
          tf.tidy(() => variable.assign(tf.add(variable, tf.zerosLike(variable))));
        }
      }
    }
    this.gpu.step(
        slots.map(s => ({param: s.param, m: s.m, v: s.v, grad: s.grad})), this.hyperparameters());
  }

  private referenceStep(slots: Array<{param: tf.Variable, grad: tf.Tensor}&Moments>): void {
    const t = this.iterations + 1;
    const {learningRate: lr, beta1, beta2, epsilon, weightDecay} = this;
    tf.tidy(() => {
      let scale: tf.Tensor|null = null;
      if (this.clipNorm != null && this.clipNorm > 0) {
        const norm = tf.sqrt(tf.addN(slots.map(s => tf.sum(tf.square(s.grad)))));
        scale = tf.div(this.clipNorm, tf.maximum(norm, this.clipNorm));
      }
      const biasCorrection1 = 1 - Math.pow(beta1, t);
      const biasCorrection2 = 1 - Math.pow(beta2, t);
      for (const s of slots) {
        const g = scale == null ? s.grad : tf.mul(s.grad, scale);
        const m = tf.add(tf.mul(s.m, beta1), tf.mul(g, 1 - beta1));
        const v = tf.add(tf.mul(s.v, beta2), tf.mul(tf.square(g), 1 - beta2));
        const step = tf.div(
            tf.div(m, biasCorrection1), tf.add(tf.sqrt(tf.div(v, biasCorrection2)), epsilon));
        const decayed = weightDecay === 0 ? s.param : tf.mul(s.param, 1 - lr * weightDecay);
        s.param.assign(tf.sub(decayed, tf.mul(step, lr)));
        s.m.assign(m);
        s.v.assign(v);
      }
    });
  }

  /**
   * The global gradient norm of the last fused step (webgpu; read from the
   * GPU), or null on the reference path or before clipping ran.
   */
  async lastGradNorm(): Promise<number|null> {
    if (this.gpu == null || this.clipNorm == null || this.clipNorm <= 0) {
      return null;
    }
    return (await this.gpu.readState()).gradNorm;
  }

  override dispose(): void {
    this.gpu?.dispose();
    this.gpu = null;
    for (const {m, v} of this.moments.values()) {
      m.dispose();
      v.dispose();
    }
    this.moments.clear();
    this.unclaimed = [];
  }

  override async getWeights(): Promise<NamedTensor[]> {
    const entries = [...this.moments.entries()];
    return [
      await this.saveIterations(),
      ...entries.map(([name, {m}]) => ({name: `${name}/m`, tensor: m as tf.Tensor})),
      ...entries.map(([name, {v}]) => ({name: `${name}/v`, tensor: v as tf.Tensor})),
    ];
  }

  override async setWeights(weightValues: NamedTensor[]): Promise<void> {
    const values = await this.extractIterations(weightValues);
    if (values.length % 2 !== 0) {
      throw new Error(`fusedAdamW.setWeights: expected first and second moments in pairs, got ${
          values.length} tensors`);
    }
    const count = values.length / 2;
    const stripped = (suffix: string, name: string) => {
      if (!name.endsWith(suffix)) {
        throw new Error(
            `fusedAdamW.setWeights: expected a name ending in '${suffix}', got '${name}'`);
      }
      return name.slice(0, -suffix.length);
    };
    const moments = new Map<string, Moments>();
    for (let i = 0; i < count; i++) {
      const first = values[i];
      const second = values[count + i];
      const name = stripped('/m', first.name);
      if (stripped('/v', second.name) !== name ||
          !tf.util.arraysEqual(first.tensor.shape, second.tensor.shape)) {
        throw new Error(`fusedAdamW.setWeights: moments of '${name}' do not match: '${
            second.name}' [${second.tensor.shape}] vs [${first.tensor.shape}]`);
      }
      moments.set(name, {m: first.tensor.variable(false), v: second.tensor.variable(false)});
    }
    for (const {m, v} of this.moments.values()) {
      m.dispose();
      v.dispose();
    }
    this.moments = moments;
    this.unclaimed = [...moments.entries()].map(([name, m]) => ({name, moments: m}));
    this.gpu?.setStep(this.iterations, this.beta1, this.beta2);
  }

  getConfig(): tf.serialization.ConfigDict {
    return {
      learningRate: this.learningRate,
      beta1: this.beta1,
      beta2: this.beta2,
      epsilon: this.epsilon,
      weightDecay: this.weightDecay,
      clipNorm: this.clipNorm,
    };
  }

  /** @nocollapse */
  static override fromConfig<T extends tf.serialization.Serializable>(
      cls: tf.serialization.SerializableConstructor<T>, config: tf.serialization.ConfigDict): T {
    return new cls(config as FusedAdamWArgs);
  }
}

tf.serialization.registerClass(FusedAdamW);

/** AdamW with decoupled weight decay (default 0.01), fused on webgpu. */
export function fusedAdamW(args: FusedAdamWArgs = {}): FusedAdamW {
  return new FusedAdamW(args);
}

/** Adam (no weight decay), fused on webgpu. */
export function fusedAdam(args: Omit<FusedAdamWArgs, 'weightDecay'> = {}): FusedAdamW {
  return new FusedAdamW({...args, weightDecay: 0});
}
