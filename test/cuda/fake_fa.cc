// Test double of kernels/cuda's C ABI (flash_attention.h) for host memory:
// records each call's fa_params as JSON and writes a recognisable pattern
// into the outputs. Linked with fake_tf.cc (test/tensorflow_kernels.test.ts)
// or built in place of the CUDA object (test/build_cuda.test.ts).
#include <stdio.h>

#include <string>
#include <vector>

#include "../../kernels/cuda/flash_attention.h"

std::vector<std::string> g_calls;  // fa_* calls, as JSON
int g_device_calls = 0;
const char* g_fail_with = nullptr;  // make the next fa_* call fail

extern "C" {

static std::string params_json(const fa_params* p) {
  char buf[512];
  snprintf(buf, sizeof(buf),
           "{\"batch\":%d,\"seq_q\":%d,\"seq_k\":%d,\"heads\":%d,\"heads_kv\":%d,"
           "\"head_dim\":%d,\"head_dim_v\":%d,\"softmax_scale\":%.9g,\"window_left\":%d,"
           "\"window_right\":%d,\"softcap\":%.9g,\"dropout_rate\":%.9g,\"seed_lo\":%u,"
           "\"seed_hi\":%u,\"alibi_kind\":%d}",
           p->batch, p->seq_q, p->seq_k, p->heads, p->heads_kv, p->head_dim, p->head_dim_v,
           p->softmax_scale, p->window_left, p->window_right, p->softcap, p->dropout_rate,
           p->seed_lo, p->seed_hi, p->alibi_kind);
  return buf;
}


const char* fa_error_string(fa_status status) {
  return status == 0 ? "ok" : "fake kernel failure";
}
size_t fa_forward_workspace_size(const fa_params* p) { return 1000 + p->seq_q; }
size_t fa_backward_workspace_size(const fa_params* p) { return 2000 + p->seq_q; }
fa_status fa_use_device_of(const void* ptr) {
  g_device_calls += ptr != nullptr;
  return 0;
}
void* fa_legacy_stream(void) { return reinterpret_cast<void*>(0x1); }

fa_status fa_forward(const fa_params* p, const float* q, const float* k, const float* v,
                     const float* alibi, float* out, float* lse, void* ws, void* stream) {
  g_calls.push_back("{\"fn\":\"fa_forward\",\"params\":" + params_json(p) +
                    ",\"alibi\":" + (alibi ? "true" : "false") +
                    ",\"workspace\":" + (ws ? "true" : "false") +
                    ",\"legacy_stream\":" + (stream == reinterpret_cast<void*>(0x1) ? "true" : "false") +
                    ",\"device_selected\":" + (g_device_calls > 0 ? "true" : "false") + "}");
  if (g_fail_with) return 7;
  const size_t no = static_cast<size_t>(p->batch) * p->seq_q * p->heads * p->head_dim_v;
  for (size_t i = 0; i < no; ++i) out[i] = q[0] + k[0] + v[0];
  for (int i = 0; i < p->batch * p->heads * p->seq_q; ++i) lse[i] = -1.5f;
  return 0;
}

fa_status fa_backward(const fa_params* p, const float* dout, const float* dlse, const float* q,
                      const float* k, const float* v, const float* out, const float* lse,
                      const float* alibi, float* dq, float* dk, float* dv, void* ws,
                      void* stream) {
  (void)dout; (void)dlse; (void)out; (void)lse; (void)q; (void)k; (void)v;
  g_calls.push_back("{\"fn\":\"fa_backward\",\"params\":" + params_json(p) +
                    ",\"alibi\":" + (alibi ? "true" : "false") +
                    ",\"workspace\":" + (ws ? "true" : "false") +
                    ",\"legacy_stream\":" + (stream == reinterpret_cast<void*>(0x1) ? "true" : "false") + "}");
  const size_t nq = static_cast<size_t>(p->batch) * p->seq_q * p->heads * p->head_dim;
  const size_t nk = static_cast<size_t>(p->batch) * p->seq_k * p->heads_kv * p->head_dim;
  const size_t nv = static_cast<size_t>(p->batch) * p->seq_k * p->heads_kv * p->head_dim_v;
  for (size_t i = 0; i < nq; ++i) dq[i] = 1.f;
  for (size_t i = 0; i < nk; ++i) dk[i] = 2.f;
  for (size_t i = 0; i < nv; ++i) dv[i] = 3.f;
  return 0;
}

}  // extern "C"
