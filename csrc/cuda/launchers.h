// Launchers of the scorefast CUDA kernels: raw pointers, sizes and a cudaStream_t, no torch.
// scorefast/backends/cuda_backend.py passes tensor data_ptr()s and the current stream.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace scorefast_cuda {

constexpr int kMaxTerms = 4;
// The SNR corrector runs as one kernel (norms, step size and update; z kept in registers) for
// samples of at most this many elements, else as three (partial norms, step sizes, update).
constexpr int64_t kSnrOneKernelMaxD = 8192;
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// The counter of one launch.  seed and the step counter n come from device scalars (int64) when
// the pointers are non-null (CUDA-graph replay advances them on the device), else from the values.
// The Philox step is n * draws + draw (mod 2^32): draw j of sampler step n, computed in-kernel.
struct CounterArgs {
  const int64_t* seed_ptr;
  const int64_t* step_ptr;
  uint64_t seed;
  int64_t step;
  int64_t draws;
  int64_t draw;
  uint32_t stream;
  const int64_t* ids;  // [B] sample ids, or null for ids = arange(B)
};

// Where a launch's coefficients live: coefficient k of sample b is
//   ptr[row * row_stride + k * k_stride + b * b_stride]
// with row = *row_ptr (the device step counter indexing a per-run table) or 0 when row_ptr is null.
//   [K, C] matrix (C = 1 shared by the batch, or B): row_ptr null, k_stride C, b_stride C > 1.
//   table [N, K] shared by the batch:                 row_ptr set, row_stride, k_stride 1, b_stride 0.
struct CoefArgs {
  const float* ptr;
  const int64_t* row_ptr;
  int64_t row_stride;
  int64_t k_stride;
  int64_t b_stride;
};

struct Terms {
  const void* ptr[kMaxTerms];
  int dtype[kMaxTerms];
  int count;
};

cudaError_t fill_noise(float* out, int64_t B, int64_t D, int64_t elem_offset, int kind,
                       CounterArgs c, cudaStream_t stream);

// out = c0*x + sum_t c_{1+t}*terms[t] + c_{T+1}*z (K = terms.count + 2 coefficients from `coefs`),
// out and x [B, D] of x_dtype, terms [B, D] each of its own dtype.  flag (null, or an int64 scalar
// holding -1): set to the step counter n when a written value is not finite and it is still -1.
cudaError_t fused_update(void* out, const void* x, int x_dtype, Terms terms, CoefArgs coefs,
                         bool with_noise, int64_t B, int64_t D, CounterArgs c, int64_t* flag,
                         cudaStream_t stream);

// out [2, B] fp32: sum of squares of t (if non-null) and of the normal noise (if with_noise),
// per sample, tiles of kNormTile summed in a fixed tree; partial holds B * tiles * 2 floats.
cudaError_t sumsq_norms(float* out, float* partial, const void* t, int t_dtype, bool with_noise,
                        int64_t B, int64_t D, CounterArgs c, cudaStream_t stream);

int64_t norm_tiles(int64_t D);

// score_sde's Langevin corrector with per-sample norms: eps_b = two_snr2 * alpha_b * |z_b|^2 /
// |score_b|^2 (0 where the score is 0), out = x + eps*score + sqrt(2 eps)*z, eps [B] fp32.
// alpha_b is coefficient 0 of sample b of `alpha` (1 when alpha.ptr is null).  scratch: snr_scratch_floats(B, D) floats.
cudaError_t snr_langevin_step(void* out, float* eps, const void* x, int x_dtype, const void* score,
                              int score_dtype, CoefArgs alpha, float two_snr2, int64_t B, int64_t D,
                              CounterArgs c, int64_t* flag, float* scratch, cudaStream_t stream);

int64_t snr_scratch_floats(int64_t B, int64_t D);

}  // namespace scorefast_cuda
