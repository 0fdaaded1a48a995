/*
 * FlashAttention forward and backward in CUDA, behind a plain C ABI that
 * knows nothing of TensorFlow (or of any framework): device pointers in,
 * device pointers out, a caller-provided workspace and a stream.
 *
 * Layouts (row-major, float32): q [B, Sq, H, D], k [B, Sk, Hk, D],
 * v [B, Sk, Hk, Dv], out/dout [B, Sq, H, Dv], lse/dlse [B, H, Sq],
 * alibi [H] or [B, H]. Semantics: docs/design.md, "Semantics" (flash_attn 2.x).
 */
#ifndef TFJS_FLASH_ATTENTION_CUDA_H_
#define TFJS_FLASH_ATTENTION_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FA_MAX_HEAD_DIM 256

typedef struct {
  int batch, seq_q, seq_k, heads, heads_kv, head_dim, head_dim_v;
  float softmax_scale;
  /* -1 = unbounded; causal is window_right = 0. */
  int window_left, window_right;
  /* 0 = off. */
  float softcap;
  /* 0 = off; Philox4x32-10 keyed by (seed_lo, seed_hi), src/dropout.ts. */
  float dropout_rate;
  uint32_t seed_lo, seed_hi;
  /* 0 = no ALiBi, 1 = slopes [H], 2 = slopes [B, H]. */
  int alibi_kind;
} fa_params;

/* 0 on success; else a code for fa_error_string. */
typedef int fa_status;

const char* fa_error_string(fa_status status);

/* Bytes of device workspace fa_forward / fa_backward need (256-aligned). */
size_t fa_forward_workspace_size(const fa_params* p);
size_t fa_backward_workspace_size(const fa_params* p);

/*
 * `stream` is a cudaStream_t (NULL = the legacy default stream). Nothing
 * is synchronised here; errors of the launches are returned.
 */
fa_status fa_forward(const fa_params* p, const float* q, const float* k,
                     const float* v, const float* alibi, float* out,
                     float* lse, void* workspace, void* stream);

/* dq, dk, dv are written (not accumulated into). */
fa_status fa_backward(const fa_params* p, const float* dout,
                      const float* dlse, const float* q, const float* k,
                      const float* v, const float* out, const float* lse,
                      const float* alibi, float* dq, float* dk, float* dv,
                      void* workspace, void* stream);

/*
 * Makes the device that holds `device_ptr` current on the calling thread
 * (framework glue calls this before fa_forward / fa_backward).
 */
fa_status fa_use_device_of(const void* device_ptr);

/* cudaStreamLegacy: the legacy default stream, as a `stream` argument. */
void* fa_legacy_stream(void);

#ifdef __cplusplus
}
#endif

#endif /* TFJS_FLASH_ATTENTION_CUDA_H_ */
