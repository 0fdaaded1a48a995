/**
 * Rotary embedding in one elementwise pass (FusedRotary on webgpu): each
 * output element reads its own value and its pair partner's, and the row's
 * cos/sin. Pairs are (i, i + rotaryDim/2), or (2i, 2i + 1) interleaved;
 * dims past rotaryDim are copied. `inverse` rotates by -theta.
 */
import {ElementwiseProgram} from './row_program';

export class RotaryProgram extends ElementwiseProgram {
  constructor(
      shape: number[], private readonly rotaryDim: number, private readonly interleaved: boolean,
      private readonly inverse: boolean) {
    super(
        ['x', 'cosTable', 'sinTable'], shape, `rotary_${rotaryDim}_${+ interleaved}_${+ inverse}`);
  }

  getUserCode(): string {
    const half = this.rotaryDim / 2;
    const pair = this.interleaved ? `let first = (d & 1) == 0;
    let j = d / 2;
    let partner = select(index - 1, index + 1, first);` :
                                    `let first = d < ${half};
    let j = select(d - ${half}, d, first);
    let partner = select(index - ${half}, index + ${half}, first);`;
    return `
fn main(index: i32) {
  if (index < uniforms.size) {
    let D = uniforms.xShape[3];
    let d = index % D;
    if (d >= ${this.rotaryDim}) {
      result[index] = x[index];
      return;
    }
    let s = (index / (D * uniforms.xShape[2])) % uniforms.xShape[1];
    ${pair}
    // y = x cos -/+ partner sin: minus for the first of a pair (forward).
    let sign = select(1.0, -1.0, first) * ${this.inverse ? '-1.0' : '1.0'};
    result[index] = x[index] * cosTable[s * ${half} + j] + sign * x[partner] * sinTable[s * ${
        half} + j];
  }
}
`;
  }
}
