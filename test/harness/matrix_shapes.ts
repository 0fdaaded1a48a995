/**
 * Subgroup-matrix shapes for the stand-in of the matrix built-ins
 * (kernels/webgpu/subgroup_matrix_wgsl.ts), shared by the tensor-core
 * forward and backward tests.
 */
import type {MatrixShape} from '../../kernels/webgpu/subgroup_matrix';

/** Two lanes per row; 8 x 8 x 8 blocks. */
export const SHAPE_A: MatrixShape = {
  M: 8,
  N: 8,
  K: 8,
  lanes: 16,
  standIn: true
};
/** Non-square blocks (M != N), K = 16: catches swapped indices. */
export const SHAPE_B: MatrixShape = {
  M: 16,
  N: 8,
  K: 16,
  lanes: 32,
  standIn: true
};
/** The real built-ins' 16 x 16 x 16 shape on 32 lanes (an H100's f16 one). */
export const SHAPE_REAL: MatrixShape = {
  M: 16,
  N: 16,
  K: 16,
  lanes: 32,
  standIn: false
};
