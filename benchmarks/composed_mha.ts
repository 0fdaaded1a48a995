/**
 * ComposedMHA: FlashMHA with the attention users compose today
 * (benchmarks/baselines.ts's matMul + softmax, holding the `[B, H, Sq, Sk]`
 * scores) instead of flashAttention. Same arguments and the same weights
 * (`composed.setWeights(flash.getWeights())`), so the demo and the
 * benchmarks compare the attention alone.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FlashMHA, FlashMHAArgs, maskedAttention, repeatKVHeads} from '../src/layers';

import {composedAttention} from './baselines';

export class ComposedMHA extends FlashMHA {
  static override className = 'ComposedMHA';

  protected override attend(
      q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D, keyMask: tf.Tensor|null,
      training: boolean): tf.Tensor4D {
    const dropoutRate = training ? this.dropout : 0;
    const plain = keyMask == null && dropoutRate === 0 && this.softcap === 0 && !this.useAlibi &&
        this.windowSize[0] < 0 && this.windowSize[1] < 0;
    if (!plain) {
      // The baseline has no such options: the masked path is composed too.
      return maskedAttention(q, k, v, {
        causal: this.causal,
        softmaxScale: this.softmaxScale,
        windowSize: this.windowSize,
        softcap: this.softcap,
        alibiSlopes: this.alibiSlopesTensor(),
        dropoutRate,
        keyMask,
      });
    }
    const groups = this.numHeads / this.numHeadsKV;
    return composedAttention(
        q, repeatKVHeads(k, groups), repeatKVHeads(v, groups),
        {causal: this.causal, softmaxScale: this.softmaxScale});
  }
}
tf.serialization.registerClass(ComposedMHA);

export function composedMHA(args: FlashMHAArgs): ComposedMHA {
  return new ComposedMHA(args);
}
