/**
 * gelu_new in one elementwise pass (FusedGelu on webgpu), written as
 * x sigmoid(2 k (x + a x^3)) (0.5 (1 + tanh(z)) = sigmoid(2 z)), whose
 * exp cannot overflow into inf / inf for large |x| as tanh's ratio could.
 */
import {ElementwiseProgram} from './row_program';

export class GeluProgram extends ElementwiseProgram {
  constructor(shape: number[]) {
    super(['x'], shape, 'geluNew');
  }

  getUserCode(): string {
    return `
fn main(index: i32) {
  if (index < uniforms.size) {
    let v = x[index];
    let z = v * (${2 * Math.sqrt(2 / Math.PI)} + ${2 * Math.sqrt(2 / Math.PI) * 0.044715} * v * v);
    result[index] = v / (1.0 + exp(-z));
  }
}
`;
  }
}
