// scorefast CUDA kernels: noise fill, fused update, per-sample sums of squares, the SNR corrector.
// Pure CUDA (no torch headers); launched on the caller's stream so CUDA graphs capture them.
//
// Layout.  The update kernels give each thread one *unit* of kUnit = 8 consecutive elements of one
// sample (two Philox groups): one 16-byte load of 16-bit data or two of fp32, where the sample's
// row starts 16-byte aligned and the unit is whole, else element by element (a tail, or a row of a
// size that leaves it misaligned).  The arithmetic of an element is the same on either path, so
// results do not depend on it.  Units are numbered flat over the batch (sample b, unit u is thread
// b * units + u), so samples of a few elements pack many to a block and every thread has work.
// The SNR corrector gives each sample T threads (a sub-warp, a warp or a block, T from D alone),
// which keep the score and z in registers between the norms and the update.
//
// Dtypes are template parameters: the state's, and the terms' when they share one (a mixed set of
// term dtypes takes one switch per term and unit, never per element).
//
// The same file, compiled by a host compiler with host_emulation.h, is scorefast._cuda_host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>
#include <type_traits>

#include "launchers.h"
#include "scorefast/philox.h"

#if !defined(SF_LAUNCH)
#define SF_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace scorefast_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kUnit = 8;           // elements a thread owns: 2 Philox groups, 16 bytes of 16-bit data
constexpr int kNormTile = 4096;    // elements per partial sum; fixed, so sums are batch-invariant
constexpr int64_t kMaxGridRows = 65535;  // the limit of gridDim.y
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- element types -----------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  __device__ __forceinline__ static float to_f32(float v) { return v; }
  __device__ __forceinline__ static float from_f32(float v) { return v; }
  __device__ __forceinline__ static bool finite(float v) { return fabsf(v) <= FLT_MAX; }
};

template <>
struct Elem<__half> {
  __device__ __forceinline__ static float to_f32(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_f32(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static unsigned short bits(__half v) { return static_cast<__half_raw>(v).x; }
  __device__ __forceinline__ static __half from_bits(unsigned short b) {
    __half_raw r;
    r.x = b;
    return __half(r);
  }
  __device__ __forceinline__ static bool finite(__half v) { return (bits(v) & 0x7c00u) != 0x7c00u; }
};

template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static unsigned short bits(__nv_bfloat16 v) {
    return static_cast<__nv_bfloat16_raw>(v).x;
  }
  __device__ __forceinline__ static __nv_bfloat16 from_bits(unsigned short b) {
    __nv_bfloat16_raw r;
    r.x = b;
    return __nv_bfloat16(r);
  }
  __device__ __forceinline__ static bool finite(__nv_bfloat16 v) { return (bits(v) & 0x7f80u) != 0x7f80u; }
};

// A term of a mixed-dtype set: its dtype is read once per unit (a uniform branch).
struct AnyDtype {};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Elements [e0, e0 + n) of a row as fp32 (n <= kUnit; the rest 0): 16-byte loads when `vec` (the
// row starts 16-byte aligned; e0 is a multiple of 8, so the unit is too) and the unit is whole.
template <typename T>
__device__ __forceinline__ void load_unit(const T* row, int64_t e0, int n, bool vec, float v[kUnit]) {
  if (vec && n == kUnit) {
    if constexpr (sizeof(T) == 4) {
      const float4* p = reinterpret_cast<const float4*>(row + e0);
      const float4 a = p[0], b = p[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
      v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + e0);
      const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[2 * i] = Elem<T>::to_f32(Elem<T>::from_bits(static_cast<unsigned short>(w[i] & 0xffffu)));
        v[2 * i + 1] = Elem<T>::to_f32(Elem<T>::from_bits(static_cast<unsigned short>(w[i] >> 16)));
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j) v[j] = j < n ? Elem<T>::to_f32(row[e0 + j]) : 0.0f;
  }
}

__device__ __forceinline__ void load_unit_any(const void* row, int dtype, int64_t e0, int n, bool vec,
                                              float v[kUnit]) {
  switch (dtype) {
    case kF16:
      load_unit(static_cast<const __half*>(row), e0, n, vec, v);
      break;
    case kBF16:
      load_unit(static_cast<const __nv_bfloat16*>(row), e0, n, vec, v);
      break;
    default:
      load_unit(static_cast<const float*>(row), e0, n, vec, v);
  }
}

// Term t's unit as fp32: TT is the terms' shared dtype, or AnyDtype for a mixed set.
template <typename TT>
__device__ __forceinline__ void load_term(const Terms& terms, int t, int64_t at, int64_t e0, int n,
                                          float v[kUnit]) {
  if constexpr (std::is_same<TT, AnyDtype>::value) {
    const int dtype = terms.dtype[t];
    const int size = dtype == kF32 ? 4 : 2;
    const char* row = static_cast<const char*>(terms.ptr[t]) + at * size;
    load_unit_any(row, dtype, e0, n, aligned16(row), v);
  } else {
    const TT* row = static_cast<const TT*>(terms.ptr[t]) + at;
    load_unit(row, e0, n, aligned16(row), v);
  }
}

// Stores the unit's n values (converted to T); returns whether a stored value is not finite.
template <typename T>
__device__ __forceinline__ bool store_unit(T* row, int64_t e0, int n, bool vec, const float acc[kUnit]) {
  bool bad = false;
  if (vec && n == kUnit) {
    if constexpr (sizeof(T) == 4) {
      float4* p = reinterpret_cast<float4*>(row + e0);
      p[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      p[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) bad |= !Elem<float>::finite(acc[j]);
    } else {
      unsigned w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const T lo = Elem<T>::from_f32(acc[2 * i]), hi = Elem<T>::from_f32(acc[2 * i + 1]);
        bad |= !Elem<T>::finite(lo) || !Elem<T>::finite(hi);
        w[i] = static_cast<unsigned>(Elem<T>::bits(lo)) | (static_cast<unsigned>(Elem<T>::bits(hi)) << 16);
      }
      *reinterpret_cast<uint4*>(row + e0) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      if (j < n) {
        const T v = Elem<T>::from_f32(acc[j]);
        bad |= !Elem<T>::finite(v);
        row[e0 + j] = v;
      }
    }
  }
  return bad;
}

// ---- counters, coefficients, the non-finite flag -----------------------------------------------

struct Resolved {
  uint64_t seed;
  uint32_t philox_step;  // n * draws + draw
  int64_t n;             // the step counter (what the flag records)
};

__device__ __forceinline__ Resolved resolve(const CounterArgs& c) {
  const uint64_t seed = c.seed_ptr ? static_cast<uint64_t>(*c.seed_ptr) : c.seed;
  const int64_t n = c.step_ptr ? *c.step_ptr : c.step;
  const uint64_t k = static_cast<uint64_t>(n) * static_cast<uint64_t>(c.draws) + static_cast<uint64_t>(c.draw);
  return Resolved{seed, static_cast<uint32_t>(k), n};
}

__device__ __forceinline__ uint32_t sample_id(const CounterArgs& c, int64_t b) {
  return c.ids ? static_cast<uint32_t>(c.ids[b]) : static_cast<uint32_t>(b);
}

// Coefficient 0 of sample b; coefficient k is at [k * cf.k_stride].
__device__ __forceinline__ const float* coef_base(const CoefArgs& cf, int64_t b) {
  const int64_t row = cf.row_ptr ? *cf.row_ptr : 0;
  return cf.ptr + row * cf.row_stride + b * cf.b_stride;
}

// The corrector's alpha of sample b: coefficient 0 of `alpha`, or 1 when there is none.
__device__ __forceinline__ float alpha_of(const CoefArgs& alpha, int64_t b) {
  return alpha.ptr ? coef_base(alpha, b)[0] : 1.0f;
}

// The first launch that writes a non-finite value records its step counter (flag starts at -1).
__device__ __forceinline__ void record_nonfinite(int64_t* flag, int64_t n) {
  if (*reinterpret_cast<volatile int64_t*>(flag) != -1) return;
  atomicCAS(reinterpret_cast<unsigned long long*>(flag), static_cast<unsigned long long>(-1LL),
            static_cast<unsigned long long>(n));
}

// ---- noise -------------------------------------------------------------------------------------

__device__ __forceinline__ void group_normals(const scorefast::Words4& w, float v[4]) {
  scorefast::box_muller(scorefast::word_to_uniform(w.w[0]), scorefast::word_to_uniform(w.w[1]), &v[0], &v[1]);
  scorefast::box_muller(scorefast::word_to_uniform(w.w[2]), scorefast::word_to_uniform(w.w[3]), &v[2], &v[3]);
}

// kind 0 uniform, 1 normal, 2 rademacher: the 4 values of one group.
__device__ __forceinline__ void group_noise(const scorefast::Words4& w, int kind, float v[4]) {
  if (kind == 1) {
    group_normals(w, v);
  } else {
    for (int j = 0; j < 4; ++j) {
      v[j] = kind == 2 ? scorefast::word_to_rademacher(w.w[j]) : scorefast::word_to_uniform(w.w[j]);
    }
  }
}

// The normals of the unit at element e0 (n valid elements; the second group only when needed).
__device__ __forceinline__ void unit_normals(const Resolved& r, uint32_t id, uint32_t stream, int64_t e0, int n,
                                             float z[kUnit]) {
  const uint32_t g = static_cast<uint32_t>(e0 / 4);
  group_normals(scorefast::contract_words(r.seed, g, r.philox_step, id, stream), z);
  if (n > 4) {
    group_normals(scorefast::contract_words(r.seed, g + 1, r.philox_step, id, stream), z + 4);
  } else {
    z[4] = z[5] = z[6] = z[7] = 0.0f;
  }
}

__device__ __forceinline__ scorefast::Words4 group_words(const CounterArgs& c, int64_t b, int64_t g) {
  const Resolved r = resolve(c);
  return scorefast::contract_words(r.seed, static_cast<uint32_t>(g), r.philox_step, sample_id(c, b), c.stream);
}

// The (sample, unit) of this thread over B samples of `units` units each; false past the end.
__device__ __forceinline__ bool thread_unit(int64_t B, int64_t units, int64_t& b, int64_t& u) {
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t total = B * units;
  if (f >= total) return false;
  if (total <= 0xffffffffLL) {  // 32-bit division where it suffices (most launches)
    const uint32_t f32 = static_cast<uint32_t>(f), units32 = static_cast<uint32_t>(units);
    b = f32 / units32;
    u = f32 - static_cast<uint32_t>(b) * units32;
  } else {
    b = f / units;
    u = f - b * units;
  }
  return true;
}

// ---- kernels -----------------------------------------------------------------------------------

// grid: (groups per sample / kThreads, min(B, kMaxGridRows))
__global__ void fill_noise_kernel(float* out, int64_t B, int64_t D, int64_t elem_offset, int kind,
                                  CounterArgs c) {
  const int64_t g = elem_offset / 4 + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t e0 = 4 * g - elem_offset;
  if (e0 >= D) return;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float v[4];
    group_noise(group_words(c, b, g), kind, v);
    for (int j = 0; j < 4; ++j) {
      const int64_t e = e0 + j;
      if (e >= 0 && e < D) out[b * D + e] = v[j];
    }
  }
}

// One unit per thread over flat (sample, unit) indices; see the file comment.
template <typename XT, typename TT>
__global__ void __launch_bounds__(kThreads)
    fused_update_kernel(XT* out, const XT* x, Terms terms, CoefArgs cf, bool with_noise, int64_t B, int64_t D,
                        int64_t units, CounterArgs c, int64_t* flag) {
  int64_t b, u;
  if (!thread_unit(B, units, b, u)) return;
  const int64_t e0 = u * kUnit;
  const int n = static_cast<int>(D - e0 < kUnit ? D - e0 : kUnit);
  const int64_t at = b * D;
  const float* coef = coef_base(cf, b);
  float acc[kUnit], v[kUnit];
  load_unit(x + at, e0, n, aligned16(x + at), v);
  const float xc = coef[0];
#pragma unroll
  for (int j = 0; j < kUnit; ++j) acc[j] = xc * v[j];
#pragma unroll
  for (int t = 0; t < kMaxTerms; ++t) {
    if (t < terms.count) {
      const float ct = coef[(1 + t) * cf.k_stride];
      load_term<TT>(terms, t, at, e0, n, v);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) acc[j] = fmaf(ct, v[j], acc[j]);
    }
  }
  if (with_noise) {
    const float zc = coef[(terms.count + 1) * cf.k_stride];
    unit_normals(resolve(c), sample_id(c, b), c.stream, e0, n, v);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) acc[j] = fmaf(zc, v[j], acc[j]);
  }
  const bool bad = store_unit(out + at, e0, n, aligned16(out + at), acc);
  if (flag && bad) record_nonfinite(flag, resolve(c).n);
}

// Block-wide sum in a fixed tree (shared memory halving), result in every thread.
__device__ float block_sum(float v, float* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  return shared[0];
}

// grid: (tiles, min(B, kMaxGridRows)); a block reduces kNormTile elements of a sample into
// partial, for samples blockIdx.y, blockIdx.y + gridDim.y, ...  T: the dtype of t (float when null).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sumsq_partial_kernel(float* partial, const T* t, bool with_noise, int64_t B, int64_t D, CounterArgs c) {
  __shared__ float shared[kThreads];
  constexpr int kUnitsPerThread = kNormTile / (kUnit * kThreads);
  const int64_t tiles = gridDim.x;
  const Resolved r = resolve(c);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float st = 0.f, sz = 0.f;
    const bool vec = t && aligned16(t + b * D);
    // thread k owns units k and k + kThreads of the tile (fixed per thread, fixed order)
#pragma unroll
    for (int m = 0; m < kUnitsPerThread; ++m) {
      const int64_t e0 = static_cast<int64_t>(blockIdx.x) * kNormTile + (m * kThreads + threadIdx.x) * kUnit;
      if (e0 >= D) break;
      const int n = static_cast<int>(D - e0 < kUnit ? D - e0 : kUnit);
      float v[kUnit];
      if (t) {
        load_unit(t + b * D, e0, n, vec, v);
#pragma unroll
        for (int j = 0; j < kUnit; ++j) st = fmaf(v[j], v[j], st);
      }
      if (with_noise) {
        unit_normals(r, sample_id(c, b), c.stream, e0, n, v);
#pragma unroll
        for (int j = 0; j < kUnit; ++j) {
          if (j < n) sz = fmaf(v[j], v[j], sz);
        }
      }
    }
    const float total_t = block_sum(st, shared);
    __syncthreads();
    const float total_z = block_sum(sz, shared);
    if (threadIdx.x == 0) {
      partial[b * tiles + blockIdx.x] = total_t;
      partial[(B + b) * tiles + blockIdx.x] = total_z;
    }
    __syncthreads();  // shared is reused by the next sample
  }
}

__global__ void sumsq_finish_kernel(float* out, const float* partial, int64_t rows, int64_t tiles) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= rows) return;
  float s = 0.f;
  for (int64_t k = 0; k < tiles; ++k) s += partial[r * tiles + k];
  out[r] = s;
}

__global__ void zero_kernel(float* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) out[i] = 0.f;
}

// The corrector's step size from the squared norms, as the composed op computes it in fp32:
// eps = (two_snr2 * alpha) * (z2 / g2), 0 where g2 is not > 0.
__device__ __forceinline__ float snr_eps(float g2, float z2, float alpha, float two_snr2) {
  return g2 > 0.0f ? (two_snr2 * alpha) * (z2 / g2) : 0.0f;
}

// The SNR corrector in one kernel: T threads (a power of two; from D alone) per sample, MU units
// each.  Score and z stay in registers from the norms to the update; the norms are summed per
// thread in unit order, then over the sample's threads in a fixed butterfly (and for T > 32 over
// its warps in warp order): the tree depends on D alone, never on the batch.
template <typename XT, typename ST, int MU>
__global__ void __launch_bounds__(kThreads)
    snr_row_kernel(XT* out, float* eps_out, const XT* x, const ST* score, CoefArgs alpha, float two_snr2,
                   int64_t B, int64_t D, int T, CounterArgs c, int64_t* flag) {
  __shared__ float red[2][kThreads / kWarp];
  const int lane = static_cast<int>(threadIdx.x) & (T - 1);
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / T) + threadIdx.x / T;
  const bool live = b < B;  // threads past the batch still take part in the shuffles and barriers
  const int64_t units = (D + kUnit - 1) / kUnit;
  const int64_t at = live ? b * D : 0;
  const Resolved r = resolve(c);
  const uint32_t id = live ? sample_id(c, b) : 0u;
  float s[MU][kUnit], z[MU][kUnit];
  float g2 = 0.0f, z2 = 0.0f;
  const bool svec = aligned16(score + at);
#pragma unroll
  for (int m = 0; m < MU; ++m) {
    const int64_t u = lane + static_cast<int64_t>(m) * T;
    const int n = live && u < units ? static_cast<int>(D - u * kUnit < kUnit ? D - u * kUnit : kUnit) : 0;
    load_unit(score + at, u * kUnit, n, svec, s[m]);
    if (n > 0) {
      unit_normals(r, id, c.stream, u * kUnit, n, z[m]);
    }
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      if (j >= n) z[m][j] = 0.0f;
      g2 = fmaf(s[m][j], s[m][j], g2);
      z2 = fmaf(z[m][j], z[m][j], z2);
    }
  }
  for (int off = (T < kWarp ? T : kWarp) / 2; off > 0; off /= 2) {
    g2 += __shfl_xor_sync(kFullMask, g2, off);
    z2 += __shfl_xor_sync(kFullMask, z2, off);
  }
  if (T > kWarp) {  // the sample's warps, added in warp order
    const int warp = static_cast<int>(threadIdx.x) / kWarp;
    if (threadIdx.x % kWarp == 0) {
      red[0][warp] = g2;
      red[1][warp] = z2;
    }
    __syncthreads();
    const int first = static_cast<int>(threadIdx.x / T) * (T / kWarp);
    g2 = red[0][first];
    z2 = red[1][first];
    for (int w = 1; w < T / kWarp; ++w) {
      g2 += red[0][first + w];
      z2 += red[1][first + w];
    }
  }
  if (!live) return;
  const float eps = snr_eps(g2, z2, alpha_of(alpha, b), two_snr2);
  const float noise_coef = sqrtf(2.0f * eps);
  if (lane == 0) eps_out[b] = eps;
  const bool xvec = aligned16(x + at), ovec = aligned16(out + at);
  bool bad = false;
#pragma unroll
  for (int m = 0; m < MU; ++m) {
    const int64_t u = lane + static_cast<int64_t>(m) * T;
    if (u >= units) break;
    const int n = static_cast<int>(D - u * kUnit < kUnit ? D - u * kUnit : kUnit);
    float acc[kUnit];
    load_unit(x + at, u * kUnit, n, xvec, acc);  // x_coef 1: acc = x
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      acc[j] = fmaf(eps, s[m][j], acc[j]);
      acc[j] = fmaf(noise_coef, z[m][j], acc[j]);
    }
    bad |= store_unit(out + at, u * kUnit, n, ovec, acc);
  }
  if (flag && bad) record_nonfinite(flag, r.n);
}

// Large samples: per-sample step sizes from the partial norms (tiles added in order), written as
// the update's [3, B] coefficient matrix (1, eps, sqrt(2 eps)) and to eps_out.
__global__ void snr_coef_kernel(float* coefs, float* eps_out, const float* partial, int64_t tiles, CoefArgs alpha,
                                float two_snr2, int64_t B) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= B) return;
  float g2 = 0.f, z2 = 0.f;
  for (int64_t k = 0; k < tiles; ++k) g2 += partial[b * tiles + k];
  for (int64_t k = 0; k < tiles; ++k) z2 += partial[(B + b) * tiles + k];
  const float eps = snr_eps(g2, z2, alpha_of(alpha, b), two_snr2);
  eps_out[b] = eps;
  coefs[b] = 1.0f;
  coefs[B + b] = eps;
  coefs[2 * B + b] = sqrtf(2.0f * eps);
}


// ---- the adaptive solvers' per-attempt kernels (rk45, adaptive_sde) ---------------------------
//
// The torch reference rounds each product and sum of these formulas on its own, and where it fuses
// (addcmul) it says so: nvcc would contract a * b + c into an fma, so the separate roundings are
// spelled out (__fmul_rn and friends; the host build has no contraction, volatile keeps it so).
#if defined(SCOREFAST_CUDA_HOST_EMULATION)
template <typename T>
__device__ __forceinline__ T rounded(T v) {  // stored and read back: the operation rounds on its own
  const volatile T r = v;
  return r;
}
__device__ __forceinline__ float mul_rn(float a, float b) { return rounded(a * b); }
__device__ __forceinline__ float add_rn(float a, float b) { return rounded(a + b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return rounded(a - b); }
__device__ __forceinline__ double dmul_rn(double a, double b) { return rounded(a * b); }
__device__ __forceinline__ double dadd_rn(double a, double b) { return rounded(a + b); }
__device__ __forceinline__ double dsub_rn(double a, double b) { return rounded(a - b); }
#else
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double dmul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double dadd_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double dsub_rn(double a, double b) { return __dsub_rn(a, b); }
#endif

__device__ __forceinline__ bool is_nan(double v) { return v != v; }

// One element of the scaled error (scorefast/ops/scaled_sumsq.py's scaled_rows_ref, in fp32):
// mode 0 (rk45) e / (atol + rtol max(|y|, |y2|)); mode 1 (adaptive_sde) (e - y) / max(atol,
// rtol max(|y|, |y2|)).  torch.maximum and clamp_min keep a NaN.
__device__ __forceinline__ float scaled_error(float e, float y, float y2, float rtol, float atol, int mode) {
  const float ay = fabsf(y), ay2 = fabsf(y2);
  const float big = (ay != ay || ay2 != ay2) ? NAN : (ay > ay2 ? ay : ay2);
  const float s = mul_rn(big, rtol);
  if (mode == 0) return e / add_rn(s, atol);
  const float scale = (s != s) ? s : (s < atol ? atol : s);
  return sub_rn(e, y) / scale;
}

// grid: (tiles, min(B, kMaxGridRows)); sumsq_partial_kernel's tiles, thread units and tree on the
// scaled error of e, y, y2 (one dtype T), which is never stored: the sums are sumsq_norms' of the
// scaled rows, bit for bit, and a sample's sum depends on D alone.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scaled_partial_kernel(float* partial, const T* e, const T* y, const T* y2, float rtol, float atol, int mode,
                          int64_t B, int64_t D) {
  __shared__ float shared[kThreads];
  constexpr int kUnitsPerThread = kNormTile / (kUnit * kThreads);
  const int64_t tiles = gridDim.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t at = b * D;
    const bool ve = aligned16(e + at), vy = aligned16(y + at), vy2 = aligned16(y2 + at);
    float s = 0.f;
#pragma unroll
    for (int m = 0; m < kUnitsPerThread; ++m) {
      const int64_t e0 = static_cast<int64_t>(blockIdx.x) * kNormTile + (m * kThreads + threadIdx.x) * kUnit;
      if (e0 >= D) break;
      const int n = static_cast<int>(D - e0 < kUnit ? D - e0 : kUnit);
      float ev[kUnit], yv[kUnit], y2v[kUnit];
      load_unit(e + at, e0, n, ve, ev);
      load_unit(y + at, e0, n, vy, yv);
      load_unit(y2 + at, e0, n, vy2, y2v);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        const float v = j < n ? scaled_error(ev[j], yv[j], y2v[j], rtol, atol, mode) : 0.0f;
        s = fmaf(v, v, s);
      }
    }
    const float total = block_sum(s, shared);
    if (threadIdx.x == 0) partial[b * tiles + blockIdx.x] = total;
    __syncthreads();  // shared is reused by the next sample
  }
}

// The step controller of one attempt, one thread per sample, float64 (scorefast/ops/step_control.py;
// the CPU kernel's arithmetic in csrc/cpu/adaptive_impl.h): state [9, B] rows r, h, steps, rejected,
// retry, fail, hs, t, active.  batch_err: the batch's RMS (a device scalar) or null for per-sample norms.
struct StepControlArgs {
  bool* accept;
  double* state;
  const void* sumsq;
  bool sumsq_f64;
  const double* t_end;
  const double* direction;
  const int64_t* n_ptr;
  int64_t n;
  const double* c_stage;
  int64_t S;
  double* stage_t;
  const double* base;
  const double* mult;
  int64_t R;
  void* table;
  bool table_f64;
  int64_t B;
  int64_t numel;
  const double* batch_err;
  int rule;
  double safety, exponent, e_min_grow, e_min_retry, e_max;
  bool advance;
};

__global__ void step_control_kernel(StepControlArgs a) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t B = a.B;
  if (b >= B) return;
  double* st = a.state;
  double r = st[b], h = st[B + b];
  const double t_now = st[7 * B + b];
  if (a.advance) {
    const double ss = a.sumsq_f64 ? static_cast<const double*>(a.sumsq)[b]
                                  : static_cast<double>(static_cast<const float*>(a.sumsq)[b]);
    const double err = a.batch_err ? *a.batch_err : sqrt(ss / static_cast<double>(a.numel));
    const bool on = st[8 * B + b] != 0.0;
    const bool ok = on && (err <= 1.0);
    const bool down = on != ok;
    a.accept[b] = ok;
    if (ok) r = dsub_rn(r, h);
    st[2 * B + b] += ok ? 1.0 : 0.0;
    st[3 * B + b] += down ? 1.0 : 0.0;
    double hn;
    if (a.rule == 0) {
      // the floors are float32 numbers, as the original torch.where of two Python floats made them
      const double lo = static_cast<float>((st[4 * B + b] != 0.0 || down) ? a.e_min_retry : a.e_min_grow);
      const double c = is_nan(err) ? err : fmin(fmax(err, lo), a.e_max);
      hn = h * (a.safety * pow(c, -a.exponent));
    } else {
      const double c = is_nan(err) ? err : fmax(err, 1e-10);
      hn = a.safety * h * pow(c, -a.exponent);
    }
    const bool nonfinite = !(fabs(err) <= DBL_MAX);
    const bool stuck = down && (hn <= 8.0 * DBL_EPSILON * fabs(t_now)) && !nonfinite;
    const int64_t n = a.n_ptr ? *a.n_ptr : a.n;
    if ((nonfinite || stuck) && st[5 * B + b] < 0) st[5 * B + b] = (stuck ? 0.5 : 0.0) + static_cast<double>(n);
    h = hn;
    st[4 * B + b] = down ? 1.0 : 0.0;
  } else {
    a.accept[b] = false;
  }
  h = (is_nan(h) || is_nan(r)) ? NAN : fmin(h, r);
  double hs, t;
  if (a.rule == 0) {
    const double d = a.direction[b];
    hs = h * d;
    t = dadd_rn(a.t_end[b], dmul_rn(-d, r));
  } else {
    hs = h;
    t = r + a.t_end[b];
  }
  st[b] = r;
  st[B + b] = h;
  st[6 * B + b] = hs;
  st[7 * B + b] = t;
  st[8 * B + b] = r > 0.0 ? 1.0 : 0.0;
  for (int64_t s = 0; s < a.S; ++s) a.stage_t[s * B + b] = fma(a.c_stage[s], hs, t);  // addcmul: one rounding
  for (int64_t k = 0; k < a.R; ++k) {
    const double v = fma(a.mult[k], hs, a.base[k]);
    if (a.table_f64) {
      static_cast<double*>(a.table)[k * B + b] = v;
    } else {
      static_cast<float*>(a.table)[k * B + b] = static_cast<float>(v);
    }
  }
}

// out = mask[row] ? news : olds over N words of W bytes, rows of D words (one launch per pair).
template <typename W>
__global__ void select_rows_kernel(W* out, const W* news, const W* olds, const bool* mask, int64_t N, int64_t D) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= N) return;
  out[i] = mask[i / D] ? news[i] : olds[i];  // a rejected row's new words are never read
}

// adaptive_sde's coefficient table out [10, B] (float32 or float64) from h [B] and times, a, b [2, B]
// (scorefast/ops/sde_coefs.py): float64 per sample, each product and sum rounded once, one cast at
// the store; fa, fb [2, B] (or null): an adapter's affine coefficients folded into the drift.
template <typename OT>
__global__ void sde_coefs_kernel(OT* out, const double* hp, const double* tp, const double* ap, const double* bp,
                                 const double* fap, const double* fbp, int64_t B) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= B) return;
  const double h = hp[i];
  double a0 = ap[i], a1 = ap[B + i], b0 = bp[i], b1 = bp[B + i];
  const double sh = sqrt(h), half = 0.5 * h;
  const double g0 = dmul_rn(sqrt(-b0), sh), g1 = dmul_rn(sqrt(-b1), sh);  // the noise: the SDE's own b
  if (fap) {
    a0 = dadd_rn(a0, dmul_rn(b0, fap[i]));
    a1 = dadd_rn(a1, dmul_rn(b1, fap[B + i]));
    b0 = b0 * fbp[i];
    b1 = b1 * fbp[B + i];
  }
  out[i] = static_cast<OT>(dsub_rn(1.0, dmul_rn(h, a0)));
  out[B + i] = static_cast<OT>(-(h * b0));
  out[2 * B + i] = static_cast<OT>(g0);
  out[3 * B + i] = static_cast<OT>(dsub_rn(1.0, dmul_rn(half, a0)));
  out[4 * B + i] = static_cast<OT>(-(half * b0));
  out[5 * B + i] = static_cast<OT>(-(half * a1));
  out[6 * B + i] = static_cast<OT>(-(half * b1));
  out[7 * B + i] = static_cast<OT>(0.5 * dadd_rn(g0, g1));  // rounded apart: no fma of g1's product
  out[8 * B + i] = static_cast<OT>(tp[i]);
  out[9 * B + i] = static_cast<OT>(tp[B + i]);
}

unsigned blocks_for(int64_t items) { return static_cast<unsigned>((items + kThreads - 1) / kThreads); }

unsigned grid_rows(int64_t B) { return static_cast<unsigned>(B < kMaxGridRows ? B : kMaxGridRows); }

bool fits_grid_x(int64_t items) { return (items + kThreads - 1) / kThreads <= kMaxGridX; }

int64_t units_of(int64_t D) { return (D + kUnit - 1) / kUnit; }

template <typename XT, typename TT>
void launch_update(void* out, const void* x, const Terms& terms, const CoefArgs& coefs, bool with_noise, int64_t B,
                   int64_t D, const CounterArgs& c, int64_t* flag, cudaStream_t stream) {
  const int64_t units = units_of(D);
  const auto kernel = fused_update_kernel<XT, TT>;
  SF_LAUNCH(kernel, blocks_for(B * units), kThreads, stream, static_cast<XT*>(out),
            static_cast<const XT*>(x), terms, coefs, with_noise, B, D, units, c, flag);
}

template <typename W>
void launch_select(void* out, const void* news, const void* olds, const bool* mask, int64_t N, int64_t D,
                   cudaStream_t stream) {
  SF_LAUNCH(select_rows_kernel<W>, blocks_for(N), kThreads, stream, static_cast<W*>(out), static_cast<const W*>(news),
            static_cast<const W*>(olds), mask, N, D);
}

template <typename XT>
void update_for_terms(void* out, const void* x, const Terms& terms, const CoefArgs& coefs, bool with_noise,
                      int64_t B, int64_t D, const CounterArgs& c, int64_t* flag, cudaStream_t stream) {
  bool shared = true;
  for (int t = 1; t < terms.count; ++t) shared = shared && terms.dtype[t] == terms.dtype[0];
  const int dtype = terms.count > 0 ? terms.dtype[0] : kF32;
  if (!shared) {
    launch_update<XT, AnyDtype>(out, x, terms, coefs, with_noise, B, D, c, flag, stream);
  } else if (dtype == kF16) {
    launch_update<XT, __half>(out, x, terms, coefs, with_noise, B, D, c, flag, stream);
  } else if (dtype == kBF16) {
    launch_update<XT, __nv_bfloat16>(out, x, terms, coefs, with_noise, B, D, c, flag, stream);
  } else {
    launch_update<XT, float>(out, x, terms, coefs, with_noise, B, D, c, flag, stream);
  }
}

template <typename T>
void launch_sumsq_partial(float* partial, const void* t, bool with_noise, int64_t B, int64_t D, int64_t tiles,
                          const CounterArgs& c, cudaStream_t stream) {
  const auto kernel = sumsq_partial_kernel<T>;
  SF_LAUNCH(kernel, dim3(static_cast<unsigned>(tiles), grid_rows(B)), kThreads, stream, partial,
            static_cast<const T*>(t), with_noise, B, D, c);
}

void sumsq_partial(float* partial, const void* t, int t_dtype, bool with_noise, int64_t B, int64_t D, int64_t tiles,
                   const CounterArgs& c, cudaStream_t stream) {
  if (t && t_dtype == kF16) {
    launch_sumsq_partial<__half>(partial, t, with_noise, B, D, tiles, c, stream);
  } else if (t && t_dtype == kBF16) {
    launch_sumsq_partial<__nv_bfloat16>(partial, t, with_noise, B, D, tiles, c, stream);
  } else {
    launch_sumsq_partial<float>(partial, t, with_noise, B, D, tiles, c, stream);
  }
}

// Threads per sample T and units per thread MU of the one-kernel corrector, from D alone.
void snr_shape(int64_t D, int& T, int& MU) {
  const int64_t units = units_of(D);
  T = 1;
  while (T < units && T < kThreads) T *= 2;
  const int64_t per = (units + T - 1) / T;
  MU = per <= 1 ? 1 : per <= 2 ? 2 : 4;
}

template <typename XT, typename ST, int MU>
void launch_snr_rows(void* out, float* eps, const void* x, const void* score, const CoefArgs& alpha, float two_snr2,
                     int64_t B, int64_t D, int T, const CounterArgs& c, int64_t* flag, cudaStream_t stream) {
  const int64_t rows_per_block = kThreads / T;
  const auto kernel = snr_row_kernel<XT, ST, MU>;
  SF_LAUNCH(kernel, static_cast<unsigned>((B + rows_per_block - 1) / rows_per_block), kThreads,
            stream, static_cast<XT*>(out), eps, static_cast<const XT*>(x), static_cast<const ST*>(score), alpha,
            two_snr2, B, D, T, c, flag);
}

template <typename XT, typename ST>
void snr_rows_for_mu(void* out, float* eps, const void* x, const void* score, const CoefArgs& alpha, float two_snr2,
                     int64_t B, int64_t D, const CounterArgs& c, int64_t* flag, cudaStream_t stream) {
  int T, MU;
  snr_shape(D, T, MU);
  if (MU == 1) {
    launch_snr_rows<XT, ST, 1>(out, eps, x, score, alpha, two_snr2, B, D, T, c, flag, stream);
  } else if (MU == 2) {
    launch_snr_rows<XT, ST, 2>(out, eps, x, score, alpha, two_snr2, B, D, T, c, flag, stream);
  } else {
    launch_snr_rows<XT, ST, 4>(out, eps, x, score, alpha, two_snr2, B, D, T, c, flag, stream);
  }
}

template <typename XT>
void snr_rows(void* out, float* eps, const void* x, const void* score, int score_dtype, const CoefArgs& alpha,
              float two_snr2, int64_t B, int64_t D, const CounterArgs& c, int64_t* flag, cudaStream_t stream) {
  if (score_dtype == kF16) {
    snr_rows_for_mu<XT, __half>(out, eps, x, score, alpha, two_snr2, B, D, c, flag, stream);
  } else if (score_dtype == kBF16) {
    snr_rows_for_mu<XT, __nv_bfloat16>(out, eps, x, score, alpha, two_snr2, B, D, c, flag, stream);
  } else {
    snr_rows_for_mu<XT, float>(out, eps, x, score, alpha, two_snr2, B, D, c, flag, stream);
  }
}

}  // namespace

int64_t norm_tiles(int64_t D) { return (D + kNormTile - 1) / kNormTile; }

int64_t snr_scratch_floats(int64_t B, int64_t D) {
  return D <= kSnrOneKernelMaxD ? 0 : 2 * B * norm_tiles(D) + 3 * B;
}

cudaError_t fill_noise(float* out, int64_t B, int64_t D, int64_t elem_offset, int kind,
                       CounterArgs c, cudaStream_t stream) {
  if (B == 0 || D == 0) return cudaSuccess;
  const int64_t groups = (elem_offset + D - 1) / 4 - elem_offset / 4 + 1;
  SF_LAUNCH(fill_noise_kernel, dim3(blocks_for(groups), grid_rows(B)), kThreads, stream, out, B, D,
            elem_offset, kind, c);
  return cudaGetLastError();
}

cudaError_t fused_update(void* out, const void* x, int x_dtype, Terms terms, CoefArgs coefs, bool with_noise,
                         int64_t B, int64_t D, CounterArgs c, int64_t* flag, cudaStream_t stream) {
  if (B == 0 || D == 0) return cudaSuccess;
  if (terms.count < 0 || terms.count > kMaxTerms) return cudaErrorInvalidValue;
  if (!fits_grid_x(B * units_of(D))) return cudaErrorInvalidValue;
  if (x_dtype == kF16) {
    update_for_terms<__half>(out, x, terms, coefs, with_noise, B, D, c, flag, stream);
  } else if (x_dtype == kBF16) {
    update_for_terms<__nv_bfloat16>(out, x, terms, coefs, with_noise, B, D, c, flag, stream);
  } else {
    update_for_terms<float>(out, x, terms, coefs, with_noise, B, D, c, flag, stream);
  }
  return cudaGetLastError();
}

cudaError_t sumsq_norms(float* out, float* partial, const void* t, int t_dtype, bool with_noise,
                        int64_t B, int64_t D, CounterArgs c, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const int64_t tiles = norm_tiles(D);
  if (tiles == 0) {  // D == 0: empty sums
    SF_LAUNCH(zero_kernel, blocks_for(2 * B), kThreads, stream, out, 2 * B);
    return cudaGetLastError();
  }
  sumsq_partial(partial, t, t_dtype, with_noise, B, D, tiles, c, stream);
  SF_LAUNCH(sumsq_finish_kernel, blocks_for(2 * B), kThreads, stream, out, partial, 2 * B, tiles);
  return cudaGetLastError();
}

cudaError_t snr_langevin_step(void* out, float* eps, const void* x, int x_dtype, const void* score,
                              int score_dtype, CoefArgs alpha, float two_snr2, int64_t B, int64_t D,
                              CounterArgs c, int64_t* flag, float* scratch, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (D == 0) {  // empty samples: zero norms, eps = 0
    SF_LAUNCH(zero_kernel, blocks_for(B), kThreads, stream, eps, B);
    return cudaGetLastError();
  }
  if (D <= kSnrOneKernelMaxD) {
    if (x_dtype == kF16) {
      snr_rows<__half>(out, eps, x, score, score_dtype, alpha, two_snr2, B, D, c, flag, stream);
    } else if (x_dtype == kBF16) {
      snr_rows<__nv_bfloat16>(out, eps, x, score, score_dtype, alpha, two_snr2, B, D, c, flag, stream);
    } else {
      snr_rows<float>(out, eps, x, score, score_dtype, alpha, two_snr2, B, D, c, flag, stream);
    }
    return cudaGetLastError();
  }
  if (scratch == nullptr) return cudaErrorInvalidValue;
  const int64_t tiles = norm_tiles(D);
  float* partial = scratch;
  float* coefs = scratch + 2 * B * tiles;
  sumsq_partial(partial, score, score_dtype, true, B, D, tiles, c, stream);
  SF_LAUNCH(snr_coef_kernel, blocks_for(B), kThreads, stream, coefs, eps, partial, tiles, alpha, two_snr2, B);
  Terms terms{};
  terms.count = 1;
  terms.ptr[0] = score;
  terms.dtype[0] = score_dtype;
  const CoefArgs per_sample{coefs, nullptr, 0, B, 1};
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return fused_update(out, x, x_dtype, terms, per_sample, true, B, D, c, flag, stream);
}

cudaError_t scaled_sumsq(float* out, float* partial, const void* e, const void* y, const void* y2, int dtype,
                         int64_t B, int64_t D, float rtol, float atol, int mode, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (mode != 0 && mode != 1) return cudaErrorInvalidValue;
  const int64_t tiles = norm_tiles(D);
  if (tiles == 0) {  // D == 0: empty sums
    SF_LAUNCH(zero_kernel, blocks_for(B), kThreads, stream, out, B);
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>(tiles), grid_rows(B));
  if (dtype == kF16) {
    SF_LAUNCH(scaled_partial_kernel<__half>, grid, kThreads, stream, partial, static_cast<const __half*>(e),
              static_cast<const __half*>(y), static_cast<const __half*>(y2), rtol, atol, mode, B, D);
  } else if (dtype == kBF16) {
    SF_LAUNCH(scaled_partial_kernel<__nv_bfloat16>, grid, kThreads, stream, partial,
              static_cast<const __nv_bfloat16*>(e), static_cast<const __nv_bfloat16*>(y),
              static_cast<const __nv_bfloat16*>(y2), rtol, atol, mode, B, D);
  } else {
    SF_LAUNCH(scaled_partial_kernel<float>, grid, kThreads, stream, partial, static_cast<const float*>(e),
              static_cast<const float*>(y), static_cast<const float*>(y2), rtol, atol, mode, B, D);
  }
  SF_LAUNCH(sumsq_finish_kernel, blocks_for(B), kThreads, stream, out, partial, B, tiles);
  return cudaGetLastError();
}

cudaError_t step_control(bool* accept, double* state, const void* sumsq, bool sumsq_f64, const double* t_end,
                         const double* direction, const int64_t* n_ptr, int64_t n, const double* c_stage, int64_t S,
                         double* stage_t, const double* base, const double* mult, int64_t R, void* table,
                         bool table_f64, int64_t B, int64_t numel, const double* batch_err, int rule, double safety,
                         double exponent, double e_min_grow, double e_min_retry, double e_max, bool advance,
                         cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if ((rule != 0 && rule != 1) || (advance && sumsq == nullptr)) return cudaErrorInvalidValue;
  const StepControlArgs args{accept, state, sumsq, sumsq_f64, t_end, direction, n_ptr, n, c_stage, S, stage_t,
                             base, mult, R, table, table_f64, B, numel, batch_err, rule, safety, exponent,
                             e_min_grow, e_min_retry, e_max, advance};
  SF_LAUNCH(step_control_kernel, blocks_for(B), kThreads, stream, args);
  return cudaGetLastError();
}

cudaError_t select_rows(void* out, const void* news, const void* olds, const bool* mask, int64_t B,
                        int64_t row_bytes, cudaStream_t stream) {
  if (B == 0 || row_bytes == 0) return cudaSuccess;
  // the widest word that divides the row and every pointer's alignment (rows start at b * row_bytes)
  int64_t w = 8;
  const uintptr_t bits = reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(news) |
                         reinterpret_cast<uintptr_t>(olds) | static_cast<uintptr_t>(row_bytes);
  while (w > 1 && (bits & static_cast<uintptr_t>(w - 1))) w /= 2;
  const int64_t D = row_bytes / w, N = B * D;
  if (!fits_grid_x(N)) return cudaErrorInvalidValue;
  switch (w) {
    case 8:
      launch_select<uint64_t>(out, news, olds, mask, N, D, stream);
      break;
    case 4:
      launch_select<uint32_t>(out, news, olds, mask, N, D, stream);
      break;
    case 2:
      launch_select<uint16_t>(out, news, olds, mask, N, D, stream);
      break;
    default:
      launch_select<uint8_t>(out, news, olds, mask, N, D, stream);
  }
  return cudaGetLastError();
}

cudaError_t sde_coefs(void* out, bool out_f64, const double* h, const double* times, const double* a,
                      const double* b, const double* fa, const double* fb, int64_t B, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if ((fa == nullptr) != (fb == nullptr)) return cudaErrorInvalidValue;
  if (out_f64) {
    SF_LAUNCH(sde_coefs_kernel<double>, blocks_for(B), kThreads, stream, static_cast<double*>(out), h, times, a, b,
              fa, fb, B);
  } else {
    SF_LAUNCH(sde_coefs_kernel<float>, blocks_for(B), kThreads, stream, static_cast<float*>(out), h, times, a, b,
              fa, fb, B);
  }
  return cudaGetLastError();
}

}  // namespace scorefast_cuda
