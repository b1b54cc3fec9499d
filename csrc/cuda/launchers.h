// Launchers of the scorefast CUDA kernels: raw pointers, sizes and a cudaStream_t, no torch.
// scorefast/backends/cuda.py passes tensor data_ptr()s and the current stream.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace scorefast_cuda {

constexpr int kMaxTerms = 4;
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// The counter of one launch.  seed/step come from device scalars (int64) when the pointers are
// non-null (CUDA-graph replay advances them on the device), else from the values.
struct CounterArgs {
  const int64_t* seed_ptr;
  const int64_t* step_ptr;
  uint64_t seed;
  uint32_t step;
  uint32_t stream;
  const int64_t* ids;  // [B] sample ids, or null for ids = arange(B)
};

struct Terms {
  const void* ptr[kMaxTerms];
  int dtype[kMaxTerms];
  int count;
};

cudaError_t fill_noise(float* out, int64_t B, int64_t D, int64_t elem_offset, int kind,
                       CounterArgs c, cudaStream_t stream);

// coefs: [terms.count + 2, coef_cols] fp32 with coef_cols 1 (shared by the batch) or B; row 0
// scales x, rows 1.. the terms, the last the noise.
cudaError_t fused_update(void* out, const void* x, int x_dtype, Terms terms, const float* coefs,
                         int64_t coef_cols, bool with_noise, int64_t B, int64_t D, CounterArgs c,
                         cudaStream_t stream);

// out [2, B] fp32: sum of squares of t (if non-null) and of the normal noise (if with_noise),
// per sample, tiles of kNormTile summed in a fixed tree; partial holds B * tiles * 2 floats.
cudaError_t sumsq_norms(float* out, float* partial, const void* t, int t_dtype, bool with_noise,
                        int64_t B, int64_t D, CounterArgs c, cudaStream_t stream);

int64_t norm_tiles(int64_t D);

}  // namespace scorefast_cuda
