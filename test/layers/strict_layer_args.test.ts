/**
 * FlashMHA's arguments and saved configs, and loadMultiHeadAttentionWeights,
 * reject what the op rejects (same specs, same FlashAttentionError), and the
 * loader writes all weights or none (issue 13).
 */
import * as tf from '@tensorflow/tfjs-core';

import {FlashAttentionError} from '../../src';
import {FlashMHA, flashMHA, FlashMHAArgs, loadMultiHeadAttentionWeights} from '../../src/layers';
import {describeBackends} from '../harness/backends';
import {expectClose, FORWARD_BOUND, freshRng, randomArray} from '../harness/problems';

function expectRejected(f: () => unknown, argument: string, pattern?: RegExp): void {
  let error: unknown;
  try {
    f();
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(FlashAttentionError);
  expect((error as FlashAttentionError).argument).toBe(argument);
  if (pattern != null) {
    expect((error as FlashAttentionError).message).toMatch(pattern);
  }
}

const BASE: FlashMHAArgs = {
  embedDim: 16,
  numHeads: 2
};

describeBackends('FlashMHA arguments', () => {
  const bad: Array<[Record<string, unknown>, string, RegExp]> = [
    [{casual: true}, 'casual', /did you mean 'causal'/],
    [{is_causal: true}, 'is_causal', /did you mean 'causal'/],
    [{dropout_p: 0.1}, 'dropout_p', /did you mean 'dropout'/],
    [{window_size: [2, 0]}, 'window_size', /did you mean 'windowSize'/],
    [{num_heads_kv: 1}, 'num_heads_kv', /did you mean 'numHeadsKV'/],
    [{useAlibi: 'false'}, 'useAlibi', /a boolean/],
    [{causal: 1}, 'causal', /a boolean/],
    [{crossAttention: 'yes'}, 'crossAttention', /a boolean/],
    [{qkvProjBias: 0}, 'qkvProjBias', /a boolean/],
    [{headDim: 300}, 'headDim', /\[1, 256\]/],
    [{softcap: 1e-45}, 'softcap', /normal float32/],
    [{softmaxScale: 1e39}, 'softmaxScale', /float32/],
    [{windowSize: [1.5, 0]}, 'windowSize', /integers/],
    [{windowSize: [Infinity, 0]}, 'windowSize', /integers/],
    [{dropout: 1}, 'dropout', /\[0, 1\)/],
    [{rotaryEmbBase: Infinity}, 'rotaryEmbBase', /finite/],
    [{precision: 'bfloat16'}, 'precision', /'float32' or 'float16', got "bfloat16"/],
  ];
  for (const [extra, argument, pattern] of bad) {
    it(`rejects ${JSON.stringify(extra)} at construction and at load`, () => {
      expectRejected(() => flashMHA({...BASE, ...extra} as FlashMHAArgs), argument, pattern);
      const config = {...flashMHA(BASE).getConfig(), ...extra};
      expectRejected(
          () => FlashMHA.fromConfig(FlashMHA as never, config as tf.serialization.ConfigDict),
          argument, pattern);
    });
  }
  it('rejects args that are not an object', () => {
    expectRejected(() => new FlashMHA(null as never), 'args');
    expectRejected(() => new FlashMHA('embedDim' as never), 'args');
  });
  it('round-trips its own config, including numHeadsKv from snake case', () => {
    const layer =
        flashMHA({...BASE, numHeadsKV: 1, windowSize: [3, 0], causal: true, precision: 'float16'});
    const config = layer.getConfig();
    expect(config.precision).toBe('float16');
    expect(flashMHA(BASE).getConfig().precision).toBe('float32');
    const {numHeadsKV, ...rest} = config;
    const copy =
        FlashMHA.fromConfig(FlashMHA as never, {...rest, numHeadsKv: numHeadsKV}) as FlashMHA;
    expect(copy.numHeadsKV).toBe(1);
    expect(copy.windowSize).toEqual([3, 0]);
    expect(copy.precision).toBe('float16');
  });
  it('treats a huge window side as unbounded, as the op does', async () => {
    const rng = freshRng();
    const x = tf.tensor3d(Float32Array.from(randomArray(2 * 6 * 16, rng)), [2, 6, 16]);
    const windows: Array<[number, number]> = [[-1, 0], [2 ** 40, 0], [6, 0], [1e300, 2 ** 31]];
    let weights: tf.Tensor[]|null = null;
    const outs: Float32Array[] = [];
    for (const windowSize of windows) {
      // causal makes the right side 0 whatever it is.
      const layer = flashMHA({...BASE, windowSize, causal: true});
      tf.dispose(layer.apply(x) as tf.Tensor);  // builds it
      if (weights == null) {
        weights = layer.getWeights().map(w => w.clone());
      } else {
        layer.setWeights(weights);
      }
      const y = layer.apply(x) as tf.Tensor;
      outs.push(await y.data() as Float32Array);
      y.dispose();
      layer.dispose();
    }
    const [reference, ...rest] = outs;
    for (const out of rest) {
      expectClose(out, reference, FORWARD_BOUND, `seed ${rng.seed}`);
    }
    tf.dispose([...weights!, x]);
  });
});

describeBackends('loadMultiHeadAttentionWeights: all or nothing', () => {
  const e = 8;
  const h = 2;
  const d = 4;
  function source(): Record<string, tf.Tensor> {
    const rng = freshRng();
    const t = (shape: number[]) =>
        tf.tensor(Float32Array.from(randomArray(shape.reduce((a, b) => a * b), rng)), shape);
    return {
      'query/kernel': t([e, h, d]),
      'query/bias': t([h, d]),
      'key/kernel': t([e, h, d]),
      'key/bias': t([h, d]),
      'value/kernel': t([e, h, d]),
      'value/bias': t([h, d]),
      'attention_output/kernel': t([h, d, e]),
      'attention_output/bias': t([e]),
    };
  }
  async function weightsOf(layer: FlashMHA): Promise<Float32Array[]> {
    return Promise.all(layer.getWeights().map(w => w.data() as Promise<Float32Array>));
  }

  const breakages: Array<[string, (w: Record<string, tf.Tensor>) => void, string, RegExp]> = [
    [
      'a misspelt key',
      w => {
        w['key/bais'] = w['key/bias'];
        delete w['key/bias'];
      },
      'key/bais', /did you mean 'key\/bias'/
    ],
    [
      'an unknown key',
      w => {
        w['rotary/kernel'] = w['key/bias'];
      },
      'rotary/kernel', /unknown weight/
    ],
    [
      'a later bias of the wrong shape',
      w => {
        w['attention_output/bias'] = tf.zeros([e + 1]);
      },
      'attention_output/bias', /shape \[8\]/
    ],
    [
      'a bias of the wrong shape',
      w => {
        w['value/bias'] = tf.zeros([h, d + 1]);
      },
      'value/bias', /shape/
    ],
    [
      'a missing kernel',
      w => {
        delete w['attention_output/kernel'];
      },
      'attention_output/kernel', /missing/
    ],
    [
      'an int32 bias',
      w => {
        w['attention_output/bias'] = tf.zeros([e], 'int32');
      },
      'attention_output/bias', /float32/
    ],
    [
      'a disposed bias',
      w => {
        w['attention_output/bias'] = tf.zeros([e]);
        w['attention_output/bias'].dispose();
      },
      'attention_output/bias', /disposed/
    ],
  ];
  for (const [what, breakIt, argument, pattern] of breakages) {
    it(`rejects ${what} and leaves every weight as it was`, async () => {
      const layer = flashMHA({embedDim: e, numHeads: h});
      tf.tidy(() => {
        layer.apply(tf.zeros([1, 3, e]));  // builds it
      });
      const before = await weightsOf(layer);
      const w = source();
      const all = Object.values(w);
      breakIt(w);
      const tensorsBefore = tf.memory().numTensors;
      expectRejected(() => loadMultiHeadAttentionWeights(layer, w as never), argument, pattern);
      expect(tf.memory().numTensors).toBe(tensorsBefore);
      const after = await weightsOf(layer);
      after.forEach((a, i) => expect(a).toEqual(before[i]));
      // The intact source loads.
      const good = source();
      loadMultiHeadAttentionWeights(layer, good as never);
      tf.dispose([...all, ...Object.values(good), ...Object.values(w).filter(t => !t.isDisposed)]);
      layer.dispose();
    });
  }
});
