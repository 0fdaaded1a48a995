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
