#!/usr/bin/env node
/**
 * Serves the browser demo on localhost (`npm run serve`, which builds dist/
 * first) and, through `startDemoServer`, the end-to-end tests.
 *
 *   /                  the demo (demo.ts, bundled here by esbuild as a user's
 *                      bundler would: `tfjs-flash-attention` is dist/index.mjs)
 *   /script-tag.html   tfjs, tfjs-backend-webgpu and the UMD bundle by script tags
 *   /vendor/...        tfjs's own UMD bundles, from node_modules
 *   /dist/...          the package's UMD bundles
 *
 * Only these files are served (no directory walking), and nothing comes
 * from the internet.
 */
'use strict';

const fs = require('fs');
const http = require('http');
const path = require('path');

const esbuild = require('esbuild');

const root = path.join(__dirname, '..', '..');
const here = (file) => path.join(__dirname, file);
const fromRoot = (file) => path.join(root, file);

/** URL path -> file on disk. */
const STATIC_FILES = {
  '/': here('index.html'),
  '/index.html': here('index.html'),
  '/script-tag.html': here('script-tag.html'),
  '/style.css': here('style.css'),
  '/vendor/tf.min.js': fromRoot('node_modules/@tensorflow/tfjs/dist/tf.min.js'),
  '/vendor/tf-backend-webgpu.min.js':
      fromRoot('node_modules/@tensorflow/tfjs-backend-webgpu/dist/tf-backend-webgpu.min.js'),
  '/dist/tfjs-flash-attention.umd.js': fromRoot('dist/tfjs-flash-attention.umd.js'),
  '/dist/tfjs-flash-attention.umd.min.js': fromRoot('dist/tfjs-flash-attention.umd.min.js'),
};

const CONTENT_TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
};

/**
 * The demo as a user's bundler makes it: the package is imported by name
 * and resolves to the built ES module, not to the sources.
 */
async function bundleDemo() {
  const builtModule = fromRoot('dist/index.mjs');
  if (!fs.existsSync(builtModule)) {
    throw new Error('dist/index.mjs is missing: run `npm run build` first');
  }
  const usePackageBuild = {
    name: 'tfjs-flash-attention-from-dist',
    setup(build) {
      build.onResolve({filter: /^tfjs-flash-attention$/}, () => ({path: builtModule}));
    },
  };
  const result = await esbuild.build({
    entryPoints: [here('demo.ts')],
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'es2020',
    minify: true,
    sourcemap: 'external',
    outfile: here('demo.js'),  // names the map; nothing is written
    write: false,
    plugins: [usePackageBuild],
    define: {'process.env.NODE_ENV': '"production"'},
    logLevel: 'warning',
  });
  const files = {};
  for (const file of result.outputFiles) {
    files['/' + path.basename(file.path)] = Buffer.from(file.contents);
  }
  return files;
}

/**
 * Starts the server; resolves to {url, close()} once it listens. Port 0
 * picks a free port.
 */
async function startDemoServer({port = 8080, host = '127.0.0.1'} = {}) {
  const bundled = await bundleDemo();
  const server = http.createServer((request, response) => {
    const urlPath = new URL(request.url, 'http://localhost').pathname;
    const send = (status, type, body) => {
      response.writeHead(status, {'Content-Type': type, 'Cache-Control': 'no-store'});
      response.end(body);
    };
    if (request.method !== 'GET' && request.method !== 'HEAD') {
      send(405, 'text/plain', 'only GET\n');
      return;
    }
    const type = CONTENT_TYPES[path.extname(urlPath) || '.html'] || 'application/octet-stream';
    if (bundled[urlPath] != null) {
      send(200, type, bundled[urlPath]);
      return;
    }
    const file = STATIC_FILES[urlPath];
    if (file == null) {
      send(404, 'text/plain', `not found: ${urlPath}\n`);
      return;
    }
    fs.readFile(file, (error, body) => {
      if (error) {
        const hint = urlPath.startsWith('/dist/') ? ' (run `npm run build`)' : '';
        send(404, 'text/plain', `cannot read ${path.relative(root, file)}${hint}\n`);
      } else {
        send(200, type, body);
      }
    });
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
  const address = server.address();
  return {
    url: `http://${host}:${address.port}/`,
    close: () => new Promise(resolve => {
      server.closeAllConnections();
      server.close(() => resolve());
    }),
  };
}

module.exports = {startDemoServer};

if (require.main === module) {
  const port = Number(process.env.PORT || 8080);
  startDemoServer({port}).then(
      ({url}) => {
        console.log(`tfjs-flash-attention demo: ${url}`);
        console.log(`script-tag example:        ${url}script-tag.html`);
        console.log('(WebGPU needs Chrome/Edge 113+; Ctrl-C stops the server)');
      },
      error => {
        console.error(error.message || error);
        process.exit(1);
      });
}
