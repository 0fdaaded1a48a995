/**
 * Forced plans in the spelling of `--variants` and `--grad-variants`: the
 * one parser of benchmarks/attention.ts (which times a plan) and
 * benchmarks/shader_stats.ts (which compiles it without timing it):
 *
 *   forward  "tm,tx,nq,ty[,o][,p0|p1][,kN][,cN][,qs][,db][,uN]", or "kN" alone
 *   backward "[D:]bc,br,qbr,qbc[,s|sk|sq][,tN|tkN|tqN][,cN|ckN|cqN][,st|stk|stq]
 *             [,p0|p0k|p0q][,ds|dsN][,dsqRxK[tT]]" (one string)
 *
 * A backward variant with a `D:` prefix (e.g. "128:64,32,64,64,...") is
 * meant for head dim D only (gradVariantForDim); `ds` turns the dS scratch
 * on (GradTiles.dsScratch: the dQ pass reads the dS the dK/dV pass
 * stored), `dsN` on with chunks of at most N MiB of scratch instead of
 * DS_SCRATCH_BUDGET_BYTES, `ds0` off: the recomputing dQ pass (else the
 * planner's DS_SCRATCH_PLANS decide: on, on GPUs, up to D=128); `dsqRxK`
 * or `dsqRxKtT`: whole-row tiles of R rows x K keys (T invocations, default
 * 128) for the dQ pass that reads dS (GradTiles.dsDq).
 *
 * (docs/webgpu_tuning.md, "The sweep", says what each flag does.)
 */
import type {GradTiles} from '../kernels/webgpu/FlashAttentionGrad';
import type {ForwardOverride} from '../kernels/webgpu/tuning';

/** A forward variant as setForwardOverride's argument. */
export function parseForwardVariant(variant: string): ForwardOverride {
  if (/^k\d+$/.test(variant)) {
    return {splits: Number(variant.slice(1))};
  }
  const fields = variant.split(',');
  const [tm, tx, nq, ty] = fields.slice(0, 4).map(Number);
  const flags = fields.slice(4);
  const unknown =
      flags.filter(f => !['o', 'p0', 'p1', 'qs', 'db'].includes(f) && !/^[kcu]\d+$/.test(f));
  if (unknown.length > 0 || fields.length < 4 || [tm, tx, nq, ty].some(x => !(x > 0))) {
    throw new Error(
        `--variants: expected "tm,tx,nq,ty[,o][,p0|p1][,kN][,cN][,qs][,db][,uN]", got "${
            variant}"`);
  }
  const number = (prefix: string) => {
    const flag = flags.find(f => new RegExp(`^${prefix}\\d+$`).test(f));
    return flag == null ? undefined : Number(flag.slice(prefix.length));
  };
  const chunks = number('c');
  const unroll = number('u');
  const prefetch = flags.find(f => f === 'p0' || f === 'p1');
  return {
    tiles: {
      tm,
      tx,
      nq,
      ty,
      outer: flags.includes('o'),
      ...(chunks == null ? {} : {dimChunks: chunks}),
      ...(flags.includes('qs') ? {streamQuery: true} : {}),
      ...(flags.includes('db') ? {doubleBuffer: true} : {}),
      ...(unroll == null ? {} : {unroll}),
    },
    prefetch: prefetch == null ? undefined : prefetch === 'p1',
    splits: number('k'),
  };
}

/**
 * A backward variant as setGradTilesOverride's argument. `streamed` (the
 * `st` flags) is a field of the tiles only in builds with the streamed
 * backward passes; pass `hasStreamed` so that a build without them refuses
 * the flag instead of compiling other kernels.
 */
export function parseGradVariant(variant: string, hasStreamed: boolean): GradTiles {
  const fields = variant.replace(/^\d+:/, '').split(',');
  const [bc, br, qbr, qbc] = fields.slice(0, 4).map(Number);
  const flags = fields.slice(4);
  const streamFlags = ['st', 'stk', 'stq'];
  const unknown = flags.filter(
      x => !['s', 'sk', 'sq', 'p0', 'p0k', 'p0q', 'ds', ...(hasStreamed ? streamFlags : [])]
                .includes(x) &&
          !/^(t|tk|tq|c|ck|cq|ds)\d+$/.test(x) && !DSQ_FLAG.test(x));
  if (unknown.length > 0 || fields.length < 4 || [bc, br, qbr, qbc].some(x => !(x > 0))) {
    throw new Error(
        `--grad-variants: expected "[D:]bc,br,qbr,qbc[,s|sk|sq][,tN|tkN|tqN][,cN|ckN|cqN]${
            hasStreamed ? '[,st|stk|stq]' :
                          ''}[,p0|p0k|p0q][,ds|dsN][,dsqRxK[tT]]", got "${variant}"`);
  }
  // The value of flag `name`, else of `both`, as a number.
  const value = (name: string, both: string) => {
    const flag = flags.find(x => new RegExp(`^${name}\\d+$`).test(x)) ??
        flags.find(x => new RegExp(`^${both}\\d+$`).test(x));
    return flag == null ? undefined : Number(flag.replace(/^[a-z]+/, ''));
  };
  const has = (one: string, both: string) => flags.includes(one) || flags.includes(both);
  const [chunksKV, chunksQ] = [value('ck', 'c'), value('cq', 'c')];
  return {
    dkdv: {
      bc,
      br,
      threads: value('tk', 't') ?? 128,
      ...(has('sk', 's') ? {split: true} : {}),
      ...(chunksKV == null ? {} : {dimChunks: chunksKV}),
      ...(has('stk', 'st') ? {streamed: true} : {}),
      ...(has('p0k', 'p0') ? {prefetch: false} : {}),
    },
    dq: {
      br: qbr,
      bc: qbc,
      threads: value('tq', 't') ?? 128,
      ...(has('sq', 's') ? {split: true} : {}),
      ...(chunksQ == null ? {} : {dimChunks: chunksQ}),
      ...(has('stq', 'st') ? {streamed: true} : {}),
      ...(has('p0q', 'p0') ? {prefetch: false} : {}),
    },
    ...dsScratchFlag(flags),
  };
}

/** `dsqRxK[tT]`: the dS-reading dQ pass's tiles. */
const DSQ_FLAG = /^dsq(\d+)x(\d+)(?:t(\d+))?$/;

/**
 * GradTiles' dS-scratch fields for the flags `ds`, `ds0` (off) or `dsN` (N
 * MiB), and `dsq...`.
 */
function dsScratchFlag(flags: string[]): Pick<GradTiles, 'dsScratch'|'dsScratchBudget'|'dsDq'> {
  const dsq = flags.map(x => DSQ_FLAG.exec(x)).find(m => m != null);
  const dsDq = dsq == null ? {} : {
    dsDq: {br: Number(dsq[1]), bc: Number(dsq[2]), threads: dsq[3] == null ? 128 : Number(dsq[3])}
  };
  const flag = flags.find(x => /^ds\d*$/.test(x));
  if (flag == null) {
    return dsDq;
  }
  const mib = flag === 'ds' ? null : Number(flag.slice(2));
  return mib === 0 ?
      {dsScratch: false} :
      {dsScratch: true, ...(mib == null ? {} : {dsScratchBudget: mib * 2 ** 20}), ...dsDq};
}

/**
 * Is a backward variant meant for head dim `d`: one without a `D:` prefix
 * is meant for every head dim, one with it for that D only.
 */
export function gradVariantForDim(variant: string, d: number): boolean {
  const prefix = /^(\d+):/.exec(variant);
  return prefix == null || Number(prefix[1]) === d;
}
