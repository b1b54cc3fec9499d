// scorefast CUDA kernels: noise fill, fused update, per-sample sums of squares.
// Pure CUDA (no torch headers); launched on the caller's stream so CUDA graphs capture them.
// Each thread owns one Philox group of 4 consecutive elements (4 normals per Philox call).
// Samples run on grid rows: a block row strides over the batch, since gridDim.y <= 65535.
//
// The same file, compiled by a host compiler with host_emulation.h, is scorefast._cuda_host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"
#include "scorefast/philox.h"

#if !defined(SF_LAUNCH)
#define SF_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace scorefast_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kNormTile = 4096;  // elements per partial sum; fixed, so sums are batch-invariant
constexpr int64_t kMaxGridRows = 65535;  // the limit of gridDim.y

__device__ __forceinline__ float load_f32(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_f32(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kF16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
    case kBF16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

__device__ __forceinline__ scorefast::Words4 group_words(const CounterArgs& c, int64_t b, int64_t g) {
  const uint64_t seed = c.seed_ptr ? static_cast<uint64_t>(*c.seed_ptr) : c.seed;
  const uint32_t step = c.step_ptr ? static_cast<uint32_t>(*c.step_ptr) : c.step;
  const uint32_t id = c.ids ? static_cast<uint32_t>(c.ids[b]) : static_cast<uint32_t>(b);
  return scorefast::contract_words(seed, static_cast<uint32_t>(g), step, id, c.stream);
}

// kind 0 uniform, 1 normal, 2 rademacher: the 4 values of one group.
__device__ __forceinline__ void group_noise(const scorefast::Words4& w, int kind, float v[4]) {
  if (kind == 1) {
    scorefast::box_muller(scorefast::word_to_uniform(w.w[0]), scorefast::word_to_uniform(w.w[1]),
                          &v[0], &v[1]);
    scorefast::box_muller(scorefast::word_to_uniform(w.w[2]), scorefast::word_to_uniform(w.w[3]),
                          &v[2], &v[3]);
  } else {
    for (int j = 0; j < 4; ++j) {
      v[j] = kind == 2 ? scorefast::word_to_rademacher(w.w[j]) : scorefast::word_to_uniform(w.w[j]);
    }
  }
}

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

// coefs: [terms.count + 2, coef_cols] fp32, coef_cols 1 (shared by the batch) or B.
__global__ void fused_update_kernel(void* out, const void* x, int x_dtype, Terms terms,
                                    const float* coefs, int64_t coef_cols, bool with_noise,
                                    int64_t B, int64_t D, CounterArgs c) {
  const int64_t e0 = 4 * (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x);
  if (e0 >= D) return;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const float* coef = coefs + (coef_cols == 1 ? 0 : b);
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (with_noise) group_noise(group_words(c, b, e0 / 4), 1, z);
    const float xc = coef[0];
    const float zc = coef[(terms.count + 1) * coef_cols];
    for (int j = 0; j < 4; ++j) {
      const int64_t e = e0 + j;
      if (e >= D) break;
      const int64_t i = b * D + e;
      float acc = xc * load_f32(x, x_dtype, i);
      for (int t = 0; t < terms.count; ++t) {
        acc = fmaf(coef[(1 + t) * coef_cols], load_f32(terms.ptr[t], terms.dtype[t], i), acc);
      }
      if (with_noise) acc = fmaf(zc, z[j], acc);
      store_f32(out, x_dtype, i, acc);
    }
  }
}

// Block-wide sum in a fixed tree (shared memory halving), result in thread 0.
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
// partial, for samples blockIdx.y, blockIdx.y + gridDim.y, ...
__global__ void sumsq_partial_kernel(float* partial, const void* t, int t_dtype, bool with_noise,
                                     int64_t B, int64_t D, CounterArgs c) {
  __shared__ float shared[kThreads];
  const int64_t tiles = gridDim.x;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kNormTile;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float st = 0.f, sz = 0.f;
    // thread k owns groups k, k + kThreads, ... of the tile (fixed per thread, fixed order)
    for (int64_t e0 = tile0 + 4 * threadIdx.x; e0 < tile0 + kNormTile && e0 < D; e0 += 4 * kThreads) {
      float z[4];
      if (with_noise) group_noise(group_words(c, b, e0 / 4), 1, z);
      for (int j = 0; j < 4; ++j) {
        const int64_t e = e0 + j;
        if (e >= D) break;
        if (t) {
          const float v = load_f32(t, t_dtype, b * D + e);
          st = fmaf(v, v, st);
        }
        if (with_noise) sz = fmaf(z[j], z[j], sz);
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

unsigned blocks_for(int64_t groups) { return static_cast<unsigned>((groups + kThreads - 1) / kThreads); }

unsigned grid_rows(int64_t B) { return static_cast<unsigned>(B < kMaxGridRows ? B : kMaxGridRows); }

}  // namespace

int64_t norm_tiles(int64_t D) { return (D + kNormTile - 1) / kNormTile; }

cudaError_t fill_noise(float* out, int64_t B, int64_t D, int64_t elem_offset, int kind,
                       CounterArgs c, cudaStream_t stream) {
  if (B == 0 || D == 0) return cudaSuccess;
  const int64_t groups = (elem_offset + D - 1) / 4 - elem_offset / 4 + 1;
  SF_LAUNCH(fill_noise_kernel, dim3(blocks_for(groups), grid_rows(B)), kThreads, stream, out, B, D,
            elem_offset, kind, c);
  return cudaGetLastError();
}

cudaError_t fused_update(void* out, const void* x, int x_dtype, Terms terms, const float* coefs,
                         int64_t coef_cols, bool with_noise, int64_t B, int64_t D, CounterArgs c,
                         cudaStream_t stream) {
  if (B == 0 || D == 0) return cudaSuccess;
  if (terms.count < 0 || terms.count > kMaxTerms) return cudaErrorInvalidValue;
  if (coef_cols != 1 && coef_cols != B) return cudaErrorInvalidValue;
  SF_LAUNCH(fused_update_kernel, dim3(blocks_for((D + 3) / 4), grid_rows(B)), kThreads, stream, out,
            x, x_dtype, terms, coefs, coef_cols, with_noise, B, D, c);
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
  SF_LAUNCH(sumsq_partial_kernel, dim3(static_cast<unsigned>(tiles), grid_rows(B)), kThreads, stream,
            partial, t, t_dtype, with_noise, B, D, c);
  SF_LAUNCH(sumsq_finish_kernel, blocks_for(2 * B), kThreads, stream, out, partial, 2 * B, tiles);
  return cudaGetLastError();
}

}  // namespace scorefast_cuda
