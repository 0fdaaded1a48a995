/**
 * docs/layers.md's TypeScript examples, run as written (cpu backend):
 * `tfjs-flash-attention/layers` is the built dist/layers.cjs (which takes
 * the same core module as this test), `tfjs-flash-attention` the sources.
 */
import {docExamples, runLayersExample as runExample, useLayersBuildOnCpu} from '../harness/examples';

const examples = docExamples('docs/layers.md');

describe('docs/layers.md examples', () => {
  beforeAll(useLayersBuildOnCpu);

  it('has the examples', () => {
    expect(examples.length).toBeGreaterThanOrEqual(5);
  });

  examples.forEach((source, n) => {
    const firstLine = source.split('\n').find(l => l.startsWith('const'));
    it(`example ${n + 1} runs and its checks print true (${firstLine?.slice(0, 50)})`, async () => {
      const printed = await runExample(source);
      expect(printed.length).toBeGreaterThan(0);
      expect(printed.filter(line => line !== 'true')).toEqual([]);
    });
  });
});
