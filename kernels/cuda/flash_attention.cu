/*
 * FlashAttention-2 forward and backward on tensor cores at float32 accuracy.
 *
 * Precision: every float32 operand x is split into two bfloat16 halves,
 * hi = bf16(x) and lo = bf16(x - hi), so x = hi + lo to about 2^-17
 * relative. A product a.b is taken as hi.hi + hi.lo + lo.hi (lo.lo is below
 * float32 rounding of the sum) with float32 accumulation in the tensor
 * cores (mma.sync m16n8k16 bf16). Three bf16 products cost half of what a
 * 3xTF32 split costs (k16 instead of k8 per instruction), and bf16 keeps
 * float32's exponent range, so no input is too small or too large to split.
 *
 * Pipeline of one call:
 *   split    q, k, v (and dout) -> hi/lo bf16 copies in the workspace,
 *            head-major [B, H, S_pad, HD] with zero padding up to 64 rows
 *            and HD columns, so the attention kernels need no bounds checks
 *            on loads (padded keys are masked, padded rows not written).
 *   forward  one block per (64 query rows, head, batch); 4 warps of 16 rows;
 *            K/V tiles of 64 keys double-buffered with cp.async; online
 *            softmax in float32 (exp2 of differences, so |s| ~ 1e4 stays
 *            exact enough); fully masked rows give 0 and lse = -inf.
 *   backward preprocess D_i = rowsum(dout * out) - dlse_i; then one block
 *            per (key tile, kv head, batch) that loops over the group's
 *            query heads and query tiles: S^T = K Q^T and dP^T = V dO^T
 *            with keys as rows, so P^T and dS^T are already the A operands
 *            of dV += P^T dO and dK += dS^T Q; dQ += dS K goes through
 *            shared memory and float32 atomics into dq (zeroed first).
 */
#include "flash_attention.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace {

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

constexpr int kTile = 64;  // query rows per tile; keys per forward tile
constexpr float kLog2e = 1.4426950408889634f;

struct Shape {
  int B, Sq, Sk, H, Hk, D, Dv, HD, Sqp, Skp, group, off;
  float scale, softcap, rate, keep_scale;
  uint32_t threshold, seed_lo, seed_hi;
  int left, right;
  int alibi_kind;  // 0 none, 1 [H], 2 [B, H]
};

// ---------------------------------------------------------------- helpers

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)),
               "l"(src));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(ptr)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const bf16* ptr) {
  asm volatile(
      "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "r"(smem_u32(ptr)));
}

// c += a * b, m16n8k16, bf16 in, f32 accumulate.
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4],
                                    uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The error-compensated product: hi.hi + hi.lo + lo.hi (small terms first).
__device__ __forceinline__ void mma3(float (&c)[4], const uint32_t (&ah)[4],
                                     const uint32_t (&al)[4], uint32_t bh0,
                                     uint32_t bh1, uint32_t bl0, uint32_t bl1) {
  mma(c, al, bh0, bh1);
  mma(c, ah, bl0, bl1);
  mma(c, ah, bh0, bh1);
}

// Two m16n8 accumulators += A (hi/lo) times the 16 x 16 B block at b_hi /
// b_lo, loaded with ldmatrix (transposed when TRANS): the step every
// product of the forward and backward repeats.
template <bool TRANS>
__device__ __forceinline__ void mma3_pair(float (&c0)[4], float (&c1)[4], const uint32_t (&ah)[4],
                                          const uint32_t (&al)[4], const bf16* b_hi,
                                          const bf16* b_lo) {
  uint32_t bh[4], bl[4];
  if (TRANS) {
    ldsm_x4_t(bh, b_hi);
    ldsm_x4_t(bl, b_lo);
  } else {
    ldsm_x4(bh, b_hi);
    ldsm_x4(bl, b_lo);
  }
  mma3(c0, ah, al, bh[0], bh[1], bl[0], bl[1]);
  mma3(c1, ah, al, bh[2], bh[3], bl[2], bl[3]);
}

__device__ __forceinline__ uint32_t as_u32(bf162 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

// Splits (x0, x1) into packed bf16 hi and lo words (x0 in the low half).
__device__ __forceinline__ void split2(float x0, float x1, uint32_t& hi,
                                       uint32_t& lo) {
  bf162 h = __floats2bfloat162_rn(x0, x1);
  bf162 l = __floats2bfloat162_rn(x0 - __low2float(h), x1 - __high2float(h));
  hi = as_u32(h);
  lo = as_u32(l);
}

// Philox4x32-10 (src/dropout.ts): counter (c0..c3), key (k0, k1).
__device__ __forceinline__ uint4 philox(uint32_t c0, uint32_t c1, uint32_t c2,
                                        uint32_t c3, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

__device__ __forceinline__ uint32_t word_of(uint4 w, int idx) {
  return idx == 0 ? w.x : idx == 1 ? w.y : idx == 2 ? w.z : w.w;
}

// Dropout multiplier of weight (b, h, i, j): 0 or 1 / (1 - rate).
__device__ __forceinline__ float keep_of(const Shape& s, int b, int h, int i,
                                         int j) {
  const uint4 w = philox(static_cast<uint32_t>(j) >> 2, i, h, b, s.seed_lo,
                         s.seed_hi);
  return word_of(w, j & 3) >= s.threshold ? s.keep_scale : 0.f;
}

__device__ __forceinline__ bool visible(const Shape& s, int i, int j) {
  if (i >= s.Sq || j >= s.Sk) return false;
  const int diag = i + s.off;
  if (s.left >= 0 && j < diag - s.left) return false;
  if (s.right >= 0 && j > diag + s.right) return false;
  return true;
}

// Final score of raw product x = q.k (before the mask); th = tanh term.
__device__ __forceinline__ float score(const Shape& s, float x, float slope,
                                       int i, int j, float& th) {
  float t = x * s.scale;
  th = 0.f;
  if (s.softcap > 0.f) {
    th = tanhf(t / s.softcap);
    t = s.softcap * th;
  }
  if (s.alibi_kind != 0) t -= slope * fabsf(static_cast<float>(i + s.off - j));
  return t;
}

__device__ __forceinline__ float slope_of(const Shape& s, const float* alibi,
                                          int b, int h) {
  if (s.alibi_kind == 1) return alibi[h];
  if (s.alibi_kind == 2) return alibi[b * s.H + h];
  return 0.f;
}

// Is every (i, j) of the rectangle visible (so the mask can be skipped)?
__device__ __forceinline__ bool all_visible(const Shape& s, int i0, int i1,
                                            int j0, int j1) {
  if (j1 >= s.Sk || i1 >= s.Sq) return false;
  if (s.left >= 0 && j0 < i1 + s.off - s.left) return false;
  if (s.right >= 0 && j1 > i0 + s.off + s.right) return false;
  return true;
}

// Copies a [64 x HD] bf16 tile (global row stride HD) into shared memory
// (row stride HD + 8: 16 bytes of padding keep ldmatrix conflict-free).
template <int HD, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int tid) {
  constexpr int kChunks = HD / 8;
  constexpr int LD = HD + 8;
#pragma unroll
  for (int c = tid; c < ROWS * kChunks; c += THREADS) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    cp_async16(dst + r * LD + col, src + static_cast<size_t>(r) * HD + col);
  }
}

// ---------------------------------------------------------------- split

// x [B, S, Hx, Dx] float32 -> hi, lo [B, Hx, Sp, HD] bf16, zero padded.
__global__ void split_kernel(const float* __restrict__ x, int B, int S, int Hx,
                             int Dx, int Sp, int HD, bf16* __restrict__ hi,
                             bf16* __restrict__ lo) {
  const size_t total = static_cast<size_t>(B) * Hx * Sp * HD;
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
       idx < total; idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int d = idx % HD;
    size_t rest = idx / HD;
    const int s = rest % Sp;
    rest /= Sp;
    const int h = rest % Hx;
    const int b = rest / Hx;
    float val = 0.f;
    if (s < S && d < Dx) val = x[((static_cast<size_t>(b) * S + s) * Hx + h) * Dx + d];
    const bf16 vh = __float2bfloat16_rn(val);
    hi[idx] = vh;
    lo[idx] = __float2bfloat16_rn(val - __bfloat162float(vh));
  }
}

// ---------------------------------------------------------------- forward

template <int HD>
struct FwdConfig {
  static constexpr int kStages = HD <= 128 ? 2 : 1;
  static constexpr int LD = HD + 8;
  static constexpr int kTileElems = kTile * LD;
  // Q hi/lo + stages x (K hi/lo + V hi/lo).
  static constexpr size_t kSmem = sizeof(bf16) * kTileElems * (2 + 4 * kStages);
};

template <int HD>
__global__ void __launch_bounds__(128)
    forward_kernel(Shape s, const bf16* __restrict__ qhi, const bf16* __restrict__ qlo,
                   const bf16* __restrict__ khi, const bf16* __restrict__ klo,
                   const bf16* __restrict__ vhi, const bf16* __restrict__ vlo,
                   const float* __restrict__ alibi, float* __restrict__ out,
                   float* __restrict__ lse) {
  using C = FwdConfig<HD>;
  constexpr int LD = C::LD;
  constexpr int kStages = C::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQh = reinterpret_cast<bf16*>(smem_raw);
  bf16* sQl = sQh + C::kTileElems;
  bf16* sKV = sQl + C::kTileElems;  // stage st: Kh, Kl, Vh, Vl

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tig = lane % 4;
  // Heaviest (causal) tiles first.
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int i0 = qt * kTile;
  const float slope = slope_of(s, alibi, b, h);

  // Key tiles any row of this block can see.
  int jlo = 0, jhi = s.Sk - 1;
  const int ilast = min(i0 + kTile - 1, s.Sq - 1);
  if (s.left >= 0) jlo = max(jlo, i0 + s.off - s.left);
  if (s.right >= 0) jhi = min(jhi, ilast + s.off + s.right);
  const int t_begin = jlo / kTile;
  const int t_end = jhi < jlo ? t_begin : jhi / kTile + 1;

  const size_t q_off = (static_cast<size_t>(b) * s.H + h) * s.Sqp * HD + static_cast<size_t>(i0) * HD;
  const size_t kv_off = (static_cast<size_t>(b) * s.Hk + hk) * s.Skp * HD;

  auto issue_kv = [&](int t, int st) {
    bf16* base = sKV + st * 4 * C::kTileElems;
    const size_t o = kv_off + static_cast<size_t>(t) * kTile * HD;
    load_tile<HD, kTile, 128>(base, khi + o, tid);
    load_tile<HD, kTile, 128>(base + C::kTileElems, klo + o, tid);
    load_tile<HD, kTile, 128>(base + 2 * C::kTileElems, vhi + o, tid);
    load_tile<HD, kTile, 128>(base + 3 * C::kTileElems, vlo + o, tid);
  };

  load_tile<HD, kTile, 128>(sQh, qhi + q_off, tid);
  load_tile<HD, kTile, 128>(sQl, qlo + q_off, tid);
  if (t_begin < t_end) issue_kv(t_begin, 0);
  cp_async_commit();

  float o[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_row[2] = {-INFINITY, -INFINITY};
  float l_row[2] = {0.f, 0.f};

  const int row_base = warp * 16;
  for (int t = t_begin; t < t_end; ++t) {
    const int st = kStages == 2 ? (t - t_begin) & 1 : 0;
    if (kStages == 2 && t + 1 < t_end) {
      issue_kv(t + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      if (kStages == 1 && t > t_begin) {
        issue_kv(t, 0);  // single stage: freed by the previous iteration's barrier
        cp_async_commit();
      }
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* sKh = sKV + st * 4 * C::kTileElems;
    const bf16* sKl = sKh + C::kTileElems;
    const bf16* sVh = sKl + C::kTileElems;
    const bf16* sVl = sVh + C::kTileElems;
    const int j0 = t * kTile;

    float sc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t ah[4], al[4];
      const int aoff = (row_base + (lane % 16)) * LD + kk * 16 + (lane / 16) * 8;
      ldsm_x4(ah, sQh + aoff);
      ldsm_x4(al, sQl + aoff);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        const int boff = (np * 16 + (lane % 8) + (lane / 16) * 8) * LD + kk * 16 +
                         ((lane / 8) % 2) * 8;
        mma3_pair<false>(sc[2 * np], sc[2 * np + 1], ah, al, sKh + boff, sKl + boff);
      }
    }

    // Scores, mask, online softmax.
    const bool masked = !all_visible(s, i0, i0 + kTile - 1, j0, j0 + kTile - 1);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + row_base + g + (e >= 2 ? 8 : 0);
        const int j = j0 + n * 8 + 2 * tig + (e & 1);
        float th;
        float t_ = score(s, sc[n][e], slope, i, j, th);
        if (masked && !visible(s, i, j)) t_ = -INFINITY;
        sc[n][e] = t_;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], t_);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m_new = fmaxf(m_row[r], tile_max[r]);
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = exp2f((m_row[r] - m_use[r]) * kLog2e);
      m_row[r] = m_new;
      l_row[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f((sc[n][e] - m_use[e >> 1]) * kLog2e);
        l_row[e >> 1] += p;
        sc[n][e] = p;
      }
    }
    if (s.rate > 0.f) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = i0 + row_base + g + r * 8;
          const int j = j0 + n * 8 + 2 * tig;  // j and j + 1 share a Philox call
          const uint4 w = philox(static_cast<uint32_t>(j) >> 2, i, h, b, s.seed_lo, s.seed_hi);
          sc[n][2 * r] *= word_of(w, j & 3) >= s.threshold ? s.keep_scale : 0.f;
          sc[n][2 * r + 1] *= word_of(w, (j + 1) & 3) >= s.threshold ? s.keep_scale : 0.f;
        }
      }
    }

    // O += P V.
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      uint32_t ph[4], pl[4];
      split2(sc[2 * ks][0], sc[2 * ks][1], ph[0], pl[0]);
      split2(sc[2 * ks][2], sc[2 * ks][3], ph[1], pl[1]);
      split2(sc[2 * ks + 1][0], sc[2 * ks + 1][1], ph[2], pl[2]);
      split2(sc[2 * ks + 1][2], sc[2 * ks + 1][3], ph[3], pl[3]);
#pragma unroll
      for (int dp = 0; dp < HD / 16; ++dp) {
        const int boff = (ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + dp * 16 +
                         (lane / 16) * 8;
        mma3_pair<true>(o[2 * dp], o[2 * dp + 1], ph, pl, sVh + boff, sVl + boff);
      }
    }
    __syncthreads();  // the stage is reloaded two iterations on
  }

  // Normalise and write.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_row[r] += __shfl_xor_sync(0xffffffffu, l_row[r], 1);
    l_row[r] += __shfl_xor_sync(0xffffffffu, l_row[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + row_base + g + r * 8;
    if (i >= s.Sq) continue;
    const float inv = l_row[r] > 0.f ? 1.f / l_row[r] : 0.f;
    float* orow = out + ((static_cast<size_t>(b) * s.Sq + i) * s.H + h) * s.Dv;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      const int d = n * 8 + 2 * tig;
      if (d < s.Dv) orow[d] = o[n][2 * r] * inv;
      if (d + 1 < s.Dv) orow[d + 1] = o[n][2 * r + 1] * inv;
    }
    if (tig == 0) {
      lse[(static_cast<size_t>(b) * s.H + h) * s.Sq + i] =
          l_row[r] > 0.f ? m_row[r] + logf(l_row[r]) : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------- backward

// delta[b, h, i] = sum_d dout * out - dlse (one warp per row).
__global__ void delta_kernel(const float* __restrict__ dout, const float* __restrict__ out,
                             const float* __restrict__ dlse, int B, int Sq, int H, int Dv,
                             float* __restrict__ delta) {
  const int warps = blockDim.x / 32;
  const size_t row = static_cast<size_t>(blockIdx.x) * warps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<size_t>(B) * Sq * H) return;
  // row enumerates (b, i, h) in the layout of out.
  const float* a = dout + row * Dv;
  const float* c = out + row * Dv;
  float acc = 0.f;
  for (int d = lane; d < Dv; d += 32) acc += a[d] * c[d];
#pragma unroll
  for (int m = 16; m > 0; m /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (lane == 0) {
    const int h = row % H;
    const size_t bi = row / H;
    const int i = bi % Sq;
    const int b = bi / Sq;
    const size_t at = (static_cast<size_t>(b) * H + h) * Sq + i;
    delta[at] = acc - dlse[at];
  }
}

template <int HD>
struct BwdConfig {
  static constexpr int kWarps = HD <= 128 ? 4 : 2;
  static constexpr int kKeys = 16 * kWarps;  // keys per block
  static constexpr int LD = HD + 8;
  static constexpr int LDS = kTile + 8;  // dS^T rows
  static constexpr size_t kSmem =
      sizeof(bf16) * (4 * kKeys * LD + 4 * kTile * LD + 2 * kKeys * LDS) +
      sizeof(float) * 2 * kTile;
};

template <int HD>
__global__ void __launch_bounds__(BwdConfig<HD>::kWarps * 32)
    backward_kernel(Shape s, const bf16* __restrict__ qhi, const bf16* __restrict__ qlo,
                    const bf16* __restrict__ khi, const bf16* __restrict__ klo,
                    const bf16* __restrict__ vhi, const bf16* __restrict__ vlo,
                    const bf16* __restrict__ dohi, const bf16* __restrict__ dolo,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    const float* __restrict__ alibi, float* __restrict__ dq,
                    float* __restrict__ dk, float* __restrict__ dv) {
  using C = BwdConfig<HD>;
  constexpr int LD = C::LD, LDS = C::LDS, KEYS = C::kKeys, THREADS = C::kWarps * 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sKh = reinterpret_cast<bf16*>(smem_raw);
  bf16* sKl = sKh + KEYS * LD;
  bf16* sVh = sKl + KEYS * LD;
  bf16* sVl = sVh + KEYS * LD;
  bf16* sQh = sVl + KEYS * LD;
  bf16* sQl = sQh + kTile * LD;
  bf16* sOh = sQl + kTile * LD;
  bf16* sOl = sOh + kTile * LD;
  bf16* sSh = sOl + kTile * LD;
  bf16* sSl = sSh + KEYS * LDS;
  float* sLse = reinterpret_cast<float*>(sSl + KEYS * LDS);
  float* sDelta = sLse + kTile;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tig = lane % 4;
  const int kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int j0 = kt * KEYS;
  const int jw = j0 + warp * 16;  // this warp's first key

  const size_t kv_off = (static_cast<size_t>(b) * s.Hk + hk) * s.Skp * HD + static_cast<size_t>(j0) * HD;
  load_tile<HD, KEYS, THREADS>(sKh, khi + kv_off, tid);
  load_tile<HD, KEYS, THREADS>(sKl, klo + kv_off, tid);
  load_tile<HD, KEYS, THREADS>(sVh, vhi + kv_off, tid);
  load_tile<HD, KEYS, THREADS>(sVl, vlo + kv_off, tid);
  cp_async_commit();

  float dk_acc[HD / 8][4], dv_acc[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.f;
  }

  // Query rows that see any key of this block.
  const int jlast = min(j0 + KEYS - 1, s.Sk - 1);
  int ilo = 0, ihi = s.Sq - 1;
  if (s.right >= 0) ilo = max(ilo, j0 - s.off - s.right);
  if (s.left >= 0) ihi = min(ihi, jlast - s.off + s.left);
  const int qt_begin = ilo / kTile;
  const int qt_end = (ihi < ilo || j0 >= s.Sk) ? qt_begin : ihi / kTile + 1;

  for (int h = hk * s.group; h < (hk + 1) * s.group; ++h) {
    const float slope = slope_of(s, alibi, b, h);
    const size_t bh = static_cast<size_t>(b) * s.H + h;
    for (int qt = qt_begin; qt < qt_end; ++qt) {
      const int i0 = qt * kTile;
      __syncthreads();  // previous tile's shared memory is free
      const size_t q_off = bh * s.Sqp * HD + static_cast<size_t>(i0) * HD;
      load_tile<HD, kTile, THREADS>(sQh, qhi + q_off, tid);
      load_tile<HD, kTile, THREADS>(sQl, qlo + q_off, tid);
      load_tile<HD, kTile, THREADS>(sOh, dohi + q_off, tid);
      load_tile<HD, kTile, THREADS>(sOl, dolo + q_off, tid);
      cp_async_commit();
      for (int r = tid; r < kTile; r += THREADS) {
        const int i = i0 + r;
        float lv = 0.f, dl = 0.f;
        if (i < s.Sq) {
          lv = lse[bh * s.Sq + i];
          dl = delta[bh * s.Sq + i];
          // A fully masked row (lse = -inf) has P = 0 everywhere.
          if (lv == -INFINITY) lv = INFINITY;
        }
        sLse[r] = lv;
        sDelta[r] = dl;
      }
      cp_async_wait<0>();
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T, keys as rows.
      float st[8][4], dpt[8][4];
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        uint32_t kh[4], kl[4], vh[4], vl[4];
        const int aoff = (warp * 16 + (lane % 16)) * LD + kk * 16 + (lane / 16) * 8;
        ldsm_x4(kh, sKh + aoff);
        ldsm_x4(kl, sKl + aoff);
        ldsm_x4(vh, sVh + aoff);
        ldsm_x4(vl, sVl + aoff);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          const int boff = (np * 16 + (lane % 8) + (lane / 16) * 8) * LD + kk * 16 +
                           ((lane / 8) % 2) * 8;
          mma3_pair<false>(st[2 * np], st[2 * np + 1], kh, kl, sQh + boff, sQl + boff);
          mma3_pair<false>(dpt[2 * np], dpt[2 * np + 1], vh, vl, sOh + boff, sOl + boff);
        }
      }

      // P, dropout, dS (scaled to the raw product q.k).
      const bool masked = !all_visible(s, i0, i0 + kTile - 1, jw, jw + 15);
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = jw + g + (e >= 2 ? 8 : 0);
          const int c = n * 8 + 2 * tig + (e & 1);
          const int i = i0 + c;
          float th;
          const float t_ = score(s, st[n][e], slope, i, j, th);
          float p = 0.f;
          if (!masked || visible(s, i, j)) p = exp2f((t_ - sLse[c]) * kLog2e);
          float keep = 1.f;
          if (s.rate > 0.f) keep = keep_of(s, b, h, i, j);
          float ds = p * (dpt[n][e] * keep - sDelta[c]);
          if (s.softcap > 0.f) ds *= 1.f - th * th;
          st[n][e] = p * keep;
          dpt[n][e] = ds * s.scale;
        }
      }

      // dV += (P keep)^T dO, dK += dS^T Q (this warp's 16 keys).
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        uint32_t ph[4], pl[4], sh[4], sl[4];
        split2(st[2 * ks][0], st[2 * ks][1], ph[0], pl[0]);
        split2(st[2 * ks][2], st[2 * ks][3], ph[1], pl[1]);
        split2(st[2 * ks + 1][0], st[2 * ks + 1][1], ph[2], pl[2]);
        split2(st[2 * ks + 1][2], st[2 * ks + 1][3], ph[3], pl[3]);
        split2(dpt[2 * ks][0], dpt[2 * ks][1], sh[0], sl[0]);
        split2(dpt[2 * ks][2], dpt[2 * ks][3], sh[1], sl[1]);
        split2(dpt[2 * ks + 1][0], dpt[2 * ks + 1][1], sh[2], sl[2]);
        split2(dpt[2 * ks + 1][2], dpt[2 * ks + 1][3], sh[3], sl[3]);
        // dS^T to shared memory for dQ (rows = keys, columns = queries).
        {
          const int r0 = warp * 16 + g;
          const int c0 = ks * 16 + 2 * tig;
          *reinterpret_cast<uint32_t*>(sSh + r0 * LDS + c0) = sh[0];
          *reinterpret_cast<uint32_t*>(sSl + r0 * LDS + c0) = sl[0];
          *reinterpret_cast<uint32_t*>(sSh + (r0 + 8) * LDS + c0) = sh[1];
          *reinterpret_cast<uint32_t*>(sSl + (r0 + 8) * LDS + c0) = sl[1];
          *reinterpret_cast<uint32_t*>(sSh + r0 * LDS + c0 + 8) = sh[2];
          *reinterpret_cast<uint32_t*>(sSl + r0 * LDS + c0 + 8) = sl[2];
          *reinterpret_cast<uint32_t*>(sSh + (r0 + 8) * LDS + c0 + 8) = sh[3];
          *reinterpret_cast<uint32_t*>(sSl + (r0 + 8) * LDS + c0 + 8) = sl[3];
        }
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
          const int boff = (ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + dp * 16 +
                           (lane / 16) * 8;
          mma3_pair<true>(dv_acc[2 * dp], dv_acc[2 * dp + 1], ph, pl, sOh + boff, sOl + boff);
          mma3_pair<true>(dk_acc[2 * dp], dk_acc[2 * dp + 1], sh, sl, sQh + boff, sQl + boff);
        }
      }
      __syncthreads();

      // dQ[64 queries x HD] += dS K, 16 query rows per warp in turns,
      // 64 columns at a time, accumulated into dq with atomics.
      for (int qw = warp; qw < kTile / 16; qw += C::kWarps) {
#pragma unroll
        for (int dc = 0; dc < HD / 64; ++dc) {
          float acc[8][4];
#pragma unroll
          for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
          for (int ks = 0; ks < KEYS / 16; ++ks) {
            uint32_t ah[4], al[4];
            const int aoff = (ks * 16 + (lane % 8) + (lane / 16) * 8) * LDS + qw * 16 +
                             ((lane / 8) % 2) * 8;
            ldsm_x4_t(ah, sSh + aoff);
            ldsm_x4_t(al, sSl + aoff);
#pragma unroll
            for (int dp = 0; dp < 4; ++dp) {
              const int boff = (ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + dc * 64 +
                               dp * 16 + (lane / 16) * 8;
              mma3_pair<true>(acc[2 * dp], acc[2 * dp + 1], ah, al, sKh + boff, sKl + boff);
            }
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int i = i0 + qw * 16 + g + r * 8;
            if (i >= s.Sq) continue;
            float* drow = dq + ((static_cast<size_t>(b) * s.Sq + i) * s.H + h) * s.D;
#pragma unroll
            for (int n = 0; n < 8; ++n) {
              const int d = dc * 64 + n * 8 + 2 * tig;
              if (d + 1 < s.D && (s.D & 1) == 0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
                atomicAdd(reinterpret_cast<float2*>(drow + d),
                          make_float2(acc[n][2 * r], acc[n][2 * r + 1]));
#else
                atomicAdd(drow + d, acc[n][2 * r]);
                atomicAdd(drow + d + 1, acc[n][2 * r + 1]);
#endif
              } else {
                if (d < s.D) atomicAdd(drow + d, acc[n][2 * r]);
                if (d + 1 < s.D) atomicAdd(drow + d + 1, acc[n][2 * r + 1]);
              }
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // (no tile: K/V loads still retire before exit)

  // Write dK, dV of this warp's 16 keys.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = jw + g + r * 8;
    if (j >= s.Sk) continue;
    float* krow = dk + ((static_cast<size_t>(b) * s.Sk + j) * s.Hk + hk) * s.D;
    float* vrow = dv + ((static_cast<size_t>(b) * s.Sk + j) * s.Hk + hk) * s.Dv;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      const int d = n * 8 + 2 * tig;
      if (d < s.D) krow[d] = dk_acc[n][2 * r];
      if (d + 1 < s.D) krow[d + 1] = dk_acc[n][2 * r + 1];
      if (d < s.Dv) vrow[d] = dv_acc[n][2 * r];
      if (d + 1 < s.Dv) vrow[d + 1] = dv_acc[n][2 * r + 1];
    }
  }
}

// ---------------------------------------------------------------- host

enum : int {
  kOk = 0,
  kBadShape = 1,
  kHeadDimTooLarge = 2,
  kBadHeads = 3,
  kBadRate = 4,
  kCudaError = 100,  // + cudaError_t
};

int padded_head_dim(const fa_params* p) {
  const int d = p->head_dim > p->head_dim_v ? p->head_dim : p->head_dim_v;
  return d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

int round_up(int x, int m) { return (x + m - 1) / m * m; }

fa_status check(const fa_params* p) {
  if (p->batch < 1 || p->seq_q < 1 || p->seq_k < 1 || p->heads < 1 || p->heads_kv < 1 ||
      p->head_dim < 1 || p->head_dim_v < 1)
    return kBadShape;
  if (p->head_dim > FA_MAX_HEAD_DIM || p->head_dim_v > FA_MAX_HEAD_DIM) return kHeadDimTooLarge;
  if (p->heads % p->heads_kv != 0) return kBadHeads;
  if (!(p->dropout_rate >= 0.f && p->dropout_rate < 1.f)) return kBadRate;
  return kOk;
}

Shape make_shape(const fa_params* p) {
  Shape s;
  s.B = p->batch;
  s.Sq = p->seq_q;
  s.Sk = p->seq_k;
  s.H = p->heads;
  s.Hk = p->heads_kv;
  s.D = p->head_dim;
  s.Dv = p->head_dim_v;
  s.HD = padded_head_dim(p);
  s.Sqp = round_up(s.Sq, kTile);
  s.Skp = round_up(s.Sk, kTile);
  s.group = s.H / s.Hk;
  s.off = s.Sk - s.Sq;
  s.scale = p->softmax_scale;
  s.softcap = p->softcap;
  s.left = p->window_left;
  s.right = p->window_right;
  s.rate = p->dropout_rate;
  // threshold = min(floor(rate * 2^32), 2^32 - 1), in double as src/dropout.ts.
  const double th = floor(static_cast<double>(p->dropout_rate) * 4294967296.0);
  s.threshold = static_cast<uint32_t>(th > 4294967295.0 ? 4294967295.0 : th);
  s.keep_scale = static_cast<float>(1.0 / (1.0 - static_cast<double>(p->dropout_rate)));
  s.seed_lo = p->seed_lo;
  s.seed_hi = p->seed_hi;
  s.alibi_kind = p->alibi_kind;
  return s;
}

struct Workspace {
  bf16 *qh, *ql, *kh, *kl, *vh, *vl, *doh, *dol;
  float* delta;
  size_t bytes;
};

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

Workspace carve(const Shape& s, void* base, bool backward) {
  Workspace w = {};
  unsigned char* at = static_cast<unsigned char*>(base);
  size_t used = 0;
  auto take = [&](size_t bytes) {
    void* ptr = at == nullptr ? nullptr : at + used;
    used += align256(bytes);
    return ptr;
  };
  const size_t qn = static_cast<size_t>(s.B) * s.H * s.Sqp * s.HD * sizeof(bf16);
  const size_t kn = static_cast<size_t>(s.B) * s.Hk * s.Skp * s.HD * sizeof(bf16);
  w.qh = static_cast<bf16*>(take(qn));
  w.ql = static_cast<bf16*>(take(qn));
  w.kh = static_cast<bf16*>(take(kn));
  w.kl = static_cast<bf16*>(take(kn));
  w.vh = static_cast<bf16*>(take(kn));
  w.vl = static_cast<bf16*>(take(kn));
  if (backward) {
    w.doh = static_cast<bf16*>(take(qn));
    w.dol = static_cast<bf16*>(take(qn));
    w.delta = static_cast<float*>(take(static_cast<size_t>(s.B) * s.H * s.Sq * sizeof(float)));
  }
  w.bytes = used;
  return w;
}

fa_status last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? kOk : kCudaError + static_cast<int>(e);
}

fa_status split(const float* x, int B, int S, int Hx, int Dx, int Sp, int HD, bf16* hi,
                bf16* lo, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(B) * Hx * Sp * HD;
  const int threads = 256;
  const size_t blocks = (total + threads - 1) / threads;
  const int grid = static_cast<int>(blocks < 65536 ? blocks : 65536);
  split_kernel<<<grid, threads, 0, stream>>>(x, B, S, Hx, Dx, Sp, HD, hi, lo);
  return last_error();
}

template <int HD>
fa_status launch_forward(const Shape& s, const Workspace& w, const float* alibi, float* out,
                         float* lse, cudaStream_t stream) {
  const size_t smem = FwdConfig<HD>::kSmem;
  cudaError_t e = cudaFuncSetAttribute(forward_kernel<HD>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) return kCudaError + static_cast<int>(e);
  const dim3 grid((s.Sq + kTile - 1) / kTile, s.H, s.B);
  forward_kernel<HD><<<grid, 128, smem, stream>>>(s, w.qh, w.ql, w.kh, w.kl, w.vh, w.vl,
                                                  alibi, out, lse);
  return last_error();
}

template <int HD>
fa_status launch_backward(const Shape& s, const Workspace& w, const float* lse,
                          const float* alibi, float* dq, float* dk, float* dv,
                          cudaStream_t stream) {
  using C = BwdConfig<HD>;
  cudaError_t e = cudaFuncSetAttribute(backward_kernel<HD>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(C::kSmem));
  if (e != cudaSuccess) return kCudaError + static_cast<int>(e);
  const dim3 grid((s.Sk + C::kKeys - 1) / C::kKeys, s.Hk, s.B);
  backward_kernel<HD><<<grid, C::kWarps * 32, C::kSmem, stream>>>(
      s, w.qh, w.ql, w.kh, w.kl, w.vh, w.vl, w.doh, w.dol, lse, w.delta, alibi, dq, dk, dv);
  return last_error();
}

}  // namespace

extern "C" {

const char* fa_error_string(fa_status status) {
  switch (status) {
    case kOk: return "ok";
    case kBadShape: return "flash_attention: every dimension must be at least 1";
    case kHeadDimTooLarge: return "flash_attention: head dims above 256 are not supported";
    case kBadHeads: return "flash_attention: heads must be a multiple of heads_kv";
    case kBadRate: return "flash_attention: dropout_rate must be in [0, 1)";
    default:
      if (status >= kCudaError) return cudaGetErrorString(static_cast<cudaError_t>(status - kCudaError));
      return "flash_attention: unknown error";
  }
}

size_t fa_forward_workspace_size(const fa_params* p) {
  if (check(p) != kOk) return 0;
  return carve(make_shape(p), nullptr, false).bytes;
}

size_t fa_backward_workspace_size(const fa_params* p) {
  if (check(p) != kOk) return 0;
  return carve(make_shape(p), nullptr, true).bytes;
}

fa_status fa_forward(const fa_params* p, const float* q, const float* k, const float* v,
                     const float* alibi, float* out, float* lse, void* workspace,
                     void* stream_ptr) {
  fa_status st = check(p);
  if (st != kOk) return st;
  const Shape s = make_shape(p);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const Workspace w = carve(s, workspace, false);
  if ((st = split(q, s.B, s.Sq, s.H, s.D, s.Sqp, s.HD, w.qh, w.ql, stream))) return st;
  if ((st = split(k, s.B, s.Sk, s.Hk, s.D, s.Skp, s.HD, w.kh, w.kl, stream))) return st;
  if ((st = split(v, s.B, s.Sk, s.Hk, s.Dv, s.Skp, s.HD, w.vh, w.vl, stream))) return st;
  switch (s.HD) {
    case 64: return launch_forward<64>(s, w, alibi, out, lse, stream);
    case 128: return launch_forward<128>(s, w, alibi, out, lse, stream);
    default: return launch_forward<256>(s, w, alibi, out, lse, stream);
  }
}

fa_status fa_backward(const fa_params* p, const float* dout, const float* dlse, const float* q,
                      const float* k, const float* v, const float* out, const float* lse,
                      const float* alibi, float* dq, float* dk, float* dv, void* workspace,
                      void* stream_ptr) {
  fa_status st = check(p);
  if (st != kOk) return st;
  const Shape s = make_shape(p);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const Workspace w = carve(s, workspace, true);
  if ((st = split(q, s.B, s.Sq, s.H, s.D, s.Sqp, s.HD, w.qh, w.ql, stream))) return st;
  if ((st = split(k, s.B, s.Sk, s.Hk, s.D, s.Skp, s.HD, w.kh, w.kl, stream))) return st;
  if ((st = split(v, s.B, s.Sk, s.Hk, s.Dv, s.Skp, s.HD, w.vh, w.vl, stream))) return st;
  if ((st = split(dout, s.B, s.Sq, s.H, s.Dv, s.Sqp, s.HD, w.doh, w.dol, stream))) return st;
  {
    const size_t rows = static_cast<size_t>(s.B) * s.Sq * s.H;
    const int warps = 8;
    delta_kernel<<<static_cast<unsigned>((rows + warps - 1) / warps), warps * 32, 0, stream>>>(
        dout, out, dlse, s.B, s.Sq, s.H, s.Dv, w.delta);
    if ((st = last_error())) return st;
  }
  cudaError_t e = cudaMemsetAsync(dq, 0, sizeof(float) * s.B * s.Sq * s.H * s.D, stream);
  if (e != cudaSuccess) return kCudaError + static_cast<int>(e);
  switch (s.HD) {
    case 64: return launch_backward<64>(s, w, lse, alibi, dq, dk, dv, stream);
    case 128: return launch_backward<128>(s, w, lse, alibi, dq, dk, dv, stream);
    default: return launch_backward<256>(s, w, lse, alibi, dq, dk, dv, stream);
  }
}

fa_status fa_use_device_of(const void* device_ptr) {
  cudaPointerAttributes attrs;
  cudaError_t e = cudaPointerGetAttributes(&attrs, device_ptr);
  if (e != cudaSuccess) return kCudaError + static_cast<int>(e);
  if (attrs.type != cudaMemoryTypeDevice && attrs.type != cudaMemoryTypeManaged) {
    return kCudaError + static_cast<int>(cudaErrorInvalidDevicePointer);
  }
  e = cudaSetDevice(attrs.device);
  return e == cudaSuccess ? kOk : kCudaError + static_cast<int>(e);
}

void* fa_legacy_stream(void) { return static_cast<void*>(cudaStreamLegacy); }

}  // extern "C"
