/**
 * docs/keras.md's examples, run as written: the model URL of the first is
 * served from a local HTTP server (the encoder fixture with random
 * weights), and `tfjs-flash-attention/layers` is this checkout's layers.
 */
import * as fs from 'fs';
import * as http from 'http';
import {AddressInfo} from 'net';
import * as path from 'path';

import {useBackend} from '../harness/backends';
import {runTsExample, tsBlocks} from '../harness/examples';
import {freshRng} from '../harness/problems';

import {randomWeights, readFixture, weightSpecs} from './keras_models';

const root = path.join(__dirname, '..', '..');
const doc = fs.readFileSync(path.join(root, 'docs', 'keras.md'), 'utf8');
const examples = tsBlocks(doc);
const EXAMPLE_URL = 'https://example.com/encoder/model.json';
/** The README's "Loading Keras transformer models" example (the same call). */
const readmeExamples = tsBlocks(fs.readFileSync(path.join(root, 'README.md'), 'utf8'))
                           .filter(source => source.includes(EXAMPLE_URL));

/** The layers entry: src/layers/index.ts once it exports the layer. */
function layersEntry(): unknown {
  const index = path.join(root, 'src', 'layers', 'index.ts');
  if (fs.existsSync(index)) {
    const entry = require(index);
    if (entry.MultiHeadAttention != null) {
      return entry;
    }
  }
  return require('../../src/layers/multi_head_attention');
}

/** Runs an example with the model URL replaced by the local server's. */
function runExample(source: string, url: string): Promise<string[]> {
  return runTsExample(
      source.replace(EXAMPLE_URL, url),
      name => name === 'tfjs-flash-attention/layers' ? layersEntry() : require(name));
}

/**
 * Node's fetch answers with objects of the outer realm; tfjs-layers tells
 * arrays by `instanceof Array`, which fails across jest's realms (arrays
 * then deserialize as objects). The test's fetch re-reads the body here.
 */
function sameRealmFetch(outer: typeof fetch): typeof fetch {
  return (async (input: RequestInfo|URL, init?: RequestInit) => {
           const response = await outer(input, init);
           const bytes = Uint8Array.from(new Uint8Array(await response.arrayBuffer()));
           return {
             ok: response.ok,
             status: response.status,
             statusText: response.statusText,
             headers: response.headers,
             json: async () => JSON.parse(Buffer.from(bytes).toString('utf8')),
             text: async () => Buffer.from(bytes).toString('utf8'),
             arrayBuffer: async () => bytes.buffer,
           };
         }) as unknown as typeof fetch;
}

describe('docs/keras.md examples', () => {
  let server: http.Server;
  let url: string;
  const outerFetch = globalThis.fetch;

  beforeAll(async () => {
    await useBackend('cpu');
    globalThis.fetch = sameRealmFetch(outerFetch);
    const json = readFixture('encoder_block');
    const weights = randomWeights(weightSpecs(json), freshRng()).data;
    const files: Record<string, Buffer> = {
      '/encoder/model.json': Buffer.from(JSON.stringify(json)),
      '/encoder/group1-shard1of1.bin': Buffer.from(weights.buffer),
    };
    server = http.createServer((req, res) => {
      const body = files[req.url ?? ''];
      res.writeHead(body ? 200 : 404);
      res.end(body);
    });
    await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/encoder/model.json`;
  });

  afterAll(async () => {
    globalThis.fetch = outerFetch;
    await new Promise(resolve => server.close(resolve));
  });

  it('has the loading example and the registration example', () => {
    expect(examples.length).toBe(2);
    expect(examples[0]).toContain(EXAMPLE_URL);
  });

  it('loading a Keras encoder prints the output shape it claims', async () => {
    const printed = await runExample(examples[0], url);
    expect(printed).toEqual([JSON.stringify([1, 12, 16])]);
  });

  it('the README\'s loading example prints the output shape it claims', async () => {
    expect(readmeExamples.length).toBe(1);
    const printed = await runExample(readmeExamples[0], url);
    expect(printed).toEqual([JSON.stringify([1, 12, 16])]);
  });

  it('registerMultiHeadAttention({replace: true}) runs', async () => {
    await runExample(examples[1], url);
  });
});
