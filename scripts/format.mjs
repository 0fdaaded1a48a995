#!/usr/bin/env node
/**
 * Formats the repository's TypeScript and JavaScript with clang-format (the
 * npm package's binary, configured by .clang-format), or with `--check`
 * fails listing the files that are not formatted. Template literals (the
 * WGSL generators) are tokens to clang-format: their text is never changed.
 *
 *   node scripts/format.mjs [--check]
 */
import {execFileSync, spawnSync} from 'child_process';
import {createRequire} from 'module';
import {readFileSync, writeFileSync} from 'fs';
import * as path from 'path';
import {fileURLToPath} from 'url';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
const clangFormat = require('clang-format').getNativeBinary();
const check = process.argv.includes('--check');

// Tracked files and new ones git does not ignore.
const files =
    execFileSync(
        'git',
        [
          'ls-files', '--cached', '--others', '--exclude-standard', '*.ts', '*.js', '*.mjs', '*.cjs'
        ],
        {cwd: root, encoding: 'utf8'})
        .split('\n')
        .filter(f => f !== '');
// clang-format knows .ts and .js by their ending; .mjs and .cjs go through
// stdin, named as .js.
const asJs = f => /\.[mc]js$/.test(f);
const style = ['--style=file'];

/**
 * One pass over every file: formats them, or (checkOnly) lists those that
 * are not formatted, printing why when `report`.
 */
function pass(checkOnly, report = checkOnly) {
  const bad = [];
  const plain = files.filter(f => !asJs(f));
  for (let i = 0; i < plain.length; i += 50) {
    const batch = plain.slice(i, i + 50);
    const mode = checkOnly ? ['--dry-run', '--Werror'] : ['-i'];
    const r = spawnSync(clangFormat, [...style, ...mode, ...batch], {cwd: root, encoding: 'utf8'});
    if (r.status !== 0) {
      bad.push(...batch.filter(f => r.stderr.includes(f)));
      if (report) {
        process.stderr.write(r.stderr);
      }
    }
  }
  for (const f of files.filter(asJs)) {
    const file = path.join(root, f);
    const text = readFileSync(file, 'utf8');
    const r = spawnSync(
        clangFormat, [...style, `--assume-filename=${file.replace(/[mc]js$/, 'js')}`],
        {cwd: root, encoding: 'utf8', input: text});
    if (r.status !== 0 || r.stdout !== text) {
      bad.push(f);
      if (!checkOnly && r.status === 0) {
        writeFileSync(file, r.stdout);
      } else if (report) {
        process.stderr.write(r.status !== 0 ? r.stderr : `${f}: not formatted\n`);
      }
    }
  }
  return bad;
}

// clang-format can need a second pass over nested template literals before
// its output is stable; format until `--check` would pass.
let bad = pass(check);
for (let round = 0; !check && round < 3; round++) {
  bad = pass(true, false);
  if (bad.length === 0) {
    break;
  }
  pass(false);
}
if (bad.length > 0) {
  console.error(
      check ? 'format: files above are not formatted; run `npm run format`' :
              `format: clang-format's output is not stable for ${bad.join(', ')}`);
  process.exit(1);
}
