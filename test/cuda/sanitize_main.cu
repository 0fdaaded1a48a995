// Runs fa_forward and fa_backward on small random problems of every kind,
// for compute-sanitizer (memcheck, racecheck): any out-of-bounds access,
// shared-memory race or CUDA error makes the tool (or this program) fail.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_runtime.h>

#include "../../kernels/cuda/flash_attention.h"

#define CHECK_CUDA(x)                                                   \
  do {                                                                  \
    cudaError_t e_ = (x);                                               \
    if (e_ != cudaSuccess) {                                            \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));     \
      std::exit(1);                                                     \
    }                                                                   \
  } while (0)

static float* random_device(size_t n, unsigned* state) {
  std::vector<float> host(n);
  for (auto& x : host) {
    *state = *state * 1664525u + 1013904223u;
    x = static_cast<float>(*state >> 8) / 16777216.f * 2.f - 1.f;
  }
  float* dev = nullptr;
  CHECK_CUDA(cudaMalloc(&dev, n * sizeof(float) + 4));
  CHECK_CUDA(cudaMemcpy(dev, host.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  return dev;
}

int main() {
  struct Case { int B, Sq, Sk, H, Hk, D, Dv, left, right, alibi; float softcap, rate; };
  const Case cases[] = {
      {1, 70, 90, 2, 1, 64, 64, -1, 0, 1, 0.f, 0.f},
      {2, 33, 21, 2, 2, 40, 24, 5, 3, 2, 3.f, 0.3f},
      {1, 65, 130, 2, 2, 128, 100, -1, -1, 0, 0.f, 0.1f},
      {1, 40, 40, 2, 1, 256, 200, -1, 0, 0, 0.f, 0.f},
  };
  unsigned state = 12345;
  int failures = 0;
  for (const Case& c : cases) {
    fa_params p = {c.B, c.Sq, c.Sk, c.H, c.Hk, c.D, c.Dv, 0.125f, c.left, c.right,
                   c.softcap, c.rate, 7u, 9u, c.alibi};
    const size_t nq = size_t(c.B) * c.Sq * c.H * c.D, nk = size_t(c.B) * c.Sk * c.Hk * c.D;
    const size_t nv = size_t(c.B) * c.Sk * c.Hk * c.Dv, no = size_t(c.B) * c.Sq * c.H * c.Dv;
    const size_t nl = size_t(c.B) * c.H * c.Sq;
    float *q = random_device(nq, &state), *k = random_device(nk, &state),
          *v = random_device(nv, &state), *dout = random_device(no, &state),
          *dlse = random_device(nl, &state), *alibi = random_device(size_t(c.B) * c.H, &state);
    float *out, *lse, *dq, *dk, *dv;
    CHECK_CUDA(cudaMalloc(&out, no * 4));
    CHECK_CUDA(cudaMalloc(&lse, nl * 4));
    CHECK_CUDA(cudaMalloc(&dq, nq * 4));
    CHECK_CUDA(cudaMalloc(&dk, nk * 4));
    CHECK_CUDA(cudaMalloc(&dv, nv * 4));
    void* ws = nullptr;
    const size_t wsz = fa_backward_workspace_size(&p);
    CHECK_CUDA(cudaMalloc(&ws, wsz));
    int st = fa_forward(&p, q, k, v, alibi, out, lse, ws, nullptr);
    if (st == 0) st = fa_backward(&p, dout, dlse, q, k, v, out, lse, alibi, dq, dk, dv, ws, nullptr);
    CHECK_CUDA(cudaDeviceSynchronize());
    std::printf("case B=%d Sq=%d Sk=%d H=%d Hk=%d D=%d Dv=%d: %s\n", c.B, c.Sq, c.Sk, c.H, c.Hk,
                c.D, c.Dv, fa_error_string(st));
    failures += st != 0;
    for (float* ptr : {q, k, v, dout, dlse, alibi, out, lse, dq, dk, dv}) cudaFree(ptr);
    cudaFree(ws);
  }
  // Bad input is refused before any launch.
  fa_params bad = {1, 8, 8, 3, 2, 64, 64, 0.1f, -1, -1, 0.f, 0.f, 0u, 0u, 0};
  if (fa_forward(&bad, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr) == 0) {
    std::printf("heads 3 / heads_kv 2 was not refused\n");
    failures++;
  }
  std::printf("%s\n", failures ? "SANITIZE DRIVER FAILED" : "sanitize driver ok");
  return failures ? 1 : 0;
}
