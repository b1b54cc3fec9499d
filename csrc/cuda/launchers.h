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

// The adaptive solvers' per-attempt kernels (rk45, adaptive_sde); see scorefast/ops/*.py.
// out [B] fp32: per-sample sums of squares of the scaled error of e, y, y2 [B, D] (one dtype;
// mode 0 rk45, 1 adaptive_sde) in sumsq_norms' tiles and tree; partial: B * norm_tiles(D) floats.
cudaError_t scaled_sumsq(float* out, float* partial, const void* e, const void* y, const void* y2, int dtype,
                         int64_t B, int64_t D, float rtol, float atol, int mode, cudaStream_t stream);

// The step controller (scorefast/ops/step_control.py), float64, one thread per sample.  sumsq: fp32
// or float64 [B] (read when advance); n: the attempt counter, from n_ptr when non-null; table: fp32
// or float64 [R, B]; batch_err: a device scalar holding the batch's RMS, or null for per-sample norms.
cudaError_t step_control(bool* accept, double* state, const void* sumsq, bool sumsq_f64, const double* t_end,
                         const double* direction, const int64_t* n_ptr, int64_t n, const double* c_stage, int64_t S,
                         double* stage_t, const double* base, const double* mult, int64_t R, void* table,
                         bool table_f64, int64_t B, int64_t numel, const double* batch_err, int rule, double safety,
                         double exponent, double e_min_grow, double e_min_retry, double e_max, bool advance,
                         cudaStream_t stream);

// out = mask[b] ? news : olds row by row, rows of row_bytes bytes (one pair of contiguous tensors).
cudaError_t select_rows(void* out, const void* news, const void* olds, const bool* mask, int64_t B,
                        int64_t row_bytes, cudaStream_t stream);

// adaptive_sde's coefficient table out [10, B] (fp32 or float64) from float64 h [B] and times, a, b,
// and an adapter's fa, fb (or null) [2, B] (scorefast/ops/sde_coefs.py).
cudaError_t sde_coefs(void* out, bool out_f64, const double* h, const double* times, const double* a,
                      const double* b, const double* fa, const double* fb, int64_t B, cudaStream_t stream);

}  // namespace scorefast_cuda
