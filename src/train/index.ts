export type{FusedAdamWArgs, FusedAdamWImpl} from './fused_adamw';
export {FUSED_ADAMW_IMPL, FusedAdamW, fusedAdam, fusedAdamW} from './fused_adamw';
