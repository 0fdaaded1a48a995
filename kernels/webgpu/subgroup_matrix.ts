/**
 * Subgroup matrices (tensor cores from WGSL, Dawn's
 * `chromium-experimental-subgroup-matrix` feature): which configurations a
 * device offers, and which one the attention kernels use.
 *
 * tfjs's default device requests neither this feature nor `shader-f16`;
 * a user who wants them creates the device (docs/tensor_cores.md). Without
 * them the path is off and the SIMT kernels run.
 */
/// <reference types="@webgpu/types" />

export const SUBGROUP_MATRIX_FEATURE = 'chromium-experimental-subgroup-matrix';

/** One `GPUSubgroupMatrixConfig`: left M x K, right K x N, result M x N. */
export interface SubgroupMatrixConfig {
  M: number;
  N: number;
  K: number;
  componentType: string;
  resultType: string;
}

/**
 * The shape of matrix the kernel generator targets. `standIn` replaces the
 * matrix built-ins by plain loops over workgroup memory with the same
 * semantics (f16 rounding emulated in f32), for devices without the
 * feature (SwiftShader in CI): it tests the tiling and indexing, not speed.
 */
export interface MatrixShape {
  M: number;
  N: number;
  K: number;
  /** Invocations of one subgroup (the matrix built-ins' scope). */
  lanes: number;
  standIn: boolean;
  /**
   * Hardware diagnosis only (benchmarks/tensor_cores.ts --variants): each
   * flag brings back one construct of the kernels' first hardware run, so
   * a GPU run can tell which of them breaks the results.
   */
  diagnose?: MatrixDiagnosis;
}

export interface MatrixDiagnosis {
  /**
   * The deprecated built-in forms (`subgroupMatrixLoad<T>(p, off, colMajor,
   * stride)`) instead of the layout as a template argument.
   */
  legacyBuiltins?: boolean;
  /**
   * Accumulators from the zero constructor `subgroup_matrix_result<..>()`,
   * which Tint emits as OpConstantNull (a form the Vulkan CTS does not
   * cover), instead of a fill value the compiler cannot fold.
   */
  nullAccumulator?: boolean;
  /**
   * The forward's row and tile reductions through workgroup memory instead
   * of subgroupShuffleXor and subgroupMax.
   */
  workgroupReductions?: boolean;
  /**
   * Subgroup and lane as local_invocation_index / lanes and % lanes (what
   * NVIDIA's hardware does, which WGSL does not promise) instead of the
   * subgroup_id and subgroup_invocation_id built-ins.
   */
  indexSubgroups?: boolean;
  /**
   * The forward's workgroup atomics as sessions 6 and 7 had them, 8 bytes,
   * which can leave the matrix arrays placed after them 8 bytes off the
   * 16-byte alignment the matrix loads need (WORKGROUP_SIZE_MULTIPLE in
   * subgroup_matrix_wgsl.ts).
   */
  unalignedWorkgroup?: boolean;
}

interface AdapterInfoLike {
  subgroupMinSize?: number;
  subgroupMaxSize?: number;
  subgroupMatrixConfigs?: ArrayLike<Record<string, unknown>>;
}

/**
 * Whether the real matrix built-ins may run. Since the workgroup-alignment
 * fix they match the float64 oracle on an H100 in every checked plan, but
 * they are slower than the SIMT kernels there (benchmarks/RESULTS.md,
 * "Session 8, call 1"), so the opt-in alone does not turn them on: only
 * the hardware checks and benchmarks (benchmarks/tensor_cores.ts) do,
 * until the two-pass forward (the default plan since session 9, not yet
 * run on a GPU) has passed that check and beaten the SIMT kernels.
 */
let unvalidatedAllowed = false;

/** Lets the real subgroup-matrix kernels run (hardware checks only). */
export function allowUnvalidatedTensorCores(on: boolean): void {
  unvalidatedAllowed = on;
}

/** See allowUnvalidatedTensorCores. */
export function unvalidatedTensorCoresAllowed(): boolean {
  return unvalidatedAllowed;
}

/** Adapter infos given by useAdapterInfo, per device. */
const registeredInfo = new WeakMap<GPUDevice, AdapterInfoLike>();

/**
 * Tells the WebGPU kernels what the device's adapter reports. Needed where
 * the device's own `adapterInfo` lacks the subgroup-matrix configurations:
 * Dawn's Node binding (the `webgpu` package) leaves
 * `device.adapterInfo.subgroupMatrixConfigs` empty while `adapter.info`
 * lists them, so without this the tensor-core path stays off there.
 */
export function useAdapterInfo(device: GPUDevice, info: GPUAdapterInfo): void {
  registeredInfo.set(device, info as unknown as AdapterInfoLike);
}

/**
 * The device's adapter info, or the registered one where the device's lists
 * no matrix configurations.
 */
function adapterInfoOf(device: GPUDevice): AdapterInfoLike|undefined {
  const own = (device as unknown as {adapterInfo?: AdapterInfoLike}).adapterInfo;
  const registered = registeredInfo.get(device);
  const ownConfigs = own?.subgroupMatrixConfigs?.length ?? 0;
  return ownConfigs === 0 && registered != null ? registered : own;
}

/**
 * The device's configurations. Dawn keeps their fields on the prototype
 * (a spread or JSON.stringify sees nothing), so each is read by name;
 * `resultComponentType` is the name in Dawn's design document.
 */
export function subgroupMatrixConfigs(device: GPUDevice): SubgroupMatrixConfig[] {
  const list = adapterInfoOf(device)?.subgroupMatrixConfigs;
  if (list == null) {
    return [];
  }
  return Array.from(list, c => ({
                            M: Number(c.M),
                            N: Number(c.N),
                            K: Number(c.K),
                            componentType: String(c.componentType),
                            resultType: String(c.resultType ?? c.resultComponentType),
                          }));
}

/**
 * The f16 x f16 -> f32 configuration the attention kernels use on this
 * device, or null where the features or such a configuration are missing.
 * Needs a fixed subgroup size (the kernel maps rows to lanes) that divides
 * into whole rows (lanes % M == 0, a power of two).
 */
export function pickSubgroupMatrixShape(device: GPUDevice): MatrixShape|null {
  const features = device.features;
  if (!features.has(SUBGROUP_MATRIX_FEATURE) || !features.has('shader-f16') ||
      !features.has('subgroups')) {
    return null;
  }
  const info = adapterInfoOf(device);
  const lanes = info?.subgroupMaxSize ?? 0;
  if (lanes === 0 || info?.subgroupMinSize !== lanes) {
    return null;
  }
  const usable = subgroupMatrixConfigs(device).filter(
      c => c.componentType === 'f16' && c.resultType === 'f32' && lanes % c.M === 0 &&
          c.K % 4 === 0 && c.N % 4 === 0 && (lanes / c.M & (lanes / c.M - 1)) === 0);
  // Larger K first (fewer MMAs per head-dim), then square tiles.
  usable.sort((a, b) => b.K - a.K || b.M * b.N - a.M * a.N);
  const c = usable[0];
  return c == null ? null : {M: c.M, N: c.N, K: c.K, lanes, standIn: false};
}

/** A pipeline-key fragment naming a matrix shape and its diagnosis flags. */
export function matrixShapeKey(m: MatrixShape): string {
  const d = m.diagnose ?? {};
  const letters: Array<[boolean | undefined, string]> = [
    [d.legacyBuiltins, 'L'], [d.nullAccumulator, 'Z'], [d.workgroupReductions, 'W'],
    [d.indexSubgroups, 'I'], [d.unalignedWorkgroup, 'U']
  ];
  const flags = letters.map(([on, letter]) => on ? letter : '').join('');
  return `m${m.M}n${m.N}k${m.K}l${m.lanes}${m.standIn ? 's' : 'r'}${flags}`;
}
