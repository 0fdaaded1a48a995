/**
 * docs/inference.md's complete TypeScript examples, run as written (cpu
 * backend); the IncrementalDecoder fragment (it needs a trained model) is
 * left out: test/layers/flash_mha_decode.test.ts covers it.
 */
import {docExamples, runLayersExample as runExample, useLayersBuildOnCpu} from '../harness/examples';

const examples = docExamples('docs/inference.md').filter(source => !source.includes('promptIds'));

describe('docs/inference.md examples', () => {
  beforeAll(useLayersBuildOnCpu);

  it('has the examples', () => {
    expect(examples.length).toBe(3);
  });

  examples.forEach((source, n) => {
    const firstLine = source.split('\n').find(l => l.startsWith('const'));
    it(`example ${n + 1} runs as documented (${firstLine?.slice(0, 50)})`, async () => {
      const printed = await runExample(source);
      expect(printed.length).toBeGreaterThan(0);
      expect(printed.filter(line => line === 'false')).toEqual([]);
    });
  });
});
