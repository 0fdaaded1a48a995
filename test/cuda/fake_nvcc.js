#!/usr/bin/env node
// Stands in for nvcc in test/build_cuda.test.ts: logs its arguments (one JSON
// line each call, to $FAKE_NVCC_LOG) and runs g++ with nvcc's flags mapped;
// the .cu source is replaced by the fake kernels (test/cuda/fake_fa.cc),
// since there is no CUDA here. FAKE_NVCC_FAIL=1 makes it fail.
'use strict';
const {spawnSync} = require('child_process');
const fs = require('fs');
const path = require('path');

const args = process.argv.slice(2);
fs.appendFileSync(process.env.FAKE_NVCC_LOG, JSON.stringify(args) + '\n');
if (process.env.FAKE_NVCC_FAIL === '1') {
  process.exit(2);
}
const out = [];
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a.startsWith('-gencode')) continue;
  if (a === '-Xcompiler') {
    out.push(args[++i]);
    continue;
  }
  if (a === '-Xlinker') {
    out.push(`-Wl,${args[++i]}`);
    continue;
  }
  if (a.endsWith('.cu')) {
    out.push(path.join(__dirname, 'fake_fa.cc'));
    continue;
  }
  out.push(a);
}
const r = spawnSync('g++', out, {stdio: 'inherit'});
process.exit(r.status === null ? 1 : r.status);
