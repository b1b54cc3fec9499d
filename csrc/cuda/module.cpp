// scorefast._cuda: pybind11 bindings of the CUDA launchers.  Built with no torch headers; the
// Python side passes data_ptr()s (ints) and torch.cuda.current_stream().cuda_stream.
// Built a second time as scorefast._cuda_host, over the host-emulated kernels (host_emulation.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "launchers.h"
#include "scorefast/philox.h"

namespace py = pybind11;
using namespace scorefast_cuda;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("scorefast._cuda.") + what + ": " + cudaGetErrorString(err));
  }
}

CounterArgs counter(uintptr_t seed_ptr, uintptr_t step_ptr, uint64_t seed, int64_t step, int64_t draws,
                    int64_t draw, uint32_t stream, uintptr_t ids) {
  return CounterArgs{ptr<const int64_t>(seed_ptr), ptr<const int64_t>(step_ptr), seed, step, draws, draw, stream,
                     ptr<const int64_t>(ids)};
}

CoefArgs coef_args(uintptr_t coefs, uintptr_t row_ptr, int64_t row_stride, int64_t k_stride, int64_t b_stride) {
  return CoefArgs{ptr<const float>(coefs), ptr<const int64_t>(row_ptr), row_stride, k_stride, b_stride};
}

}  // namespace

#if defined(SCOREFAST_CUDA_HOST_EMULATION)
#define SCOREFAST_CUDA_MODULE _cuda_host
constexpr bool kEmulated = true;
#else
#define SCOREFAST_CUDA_MODULE _cuda
constexpr bool kEmulated = false;
#endif

PYBIND11_MODULE(SCOREFAST_CUDA_MODULE, m) {
  m.doc() = kEmulated ? "scorefast CUDA kernels compiled for the host (emulated grid, for tests)"
                      : "scorefast CUDA kernels (raw-pointer launchers, no torch headers)";
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.attr("emulated") = kEmulated;
  m.attr("max_terms") = kMaxTerms;
  m.attr("snr_one_kernel_max_d") = kSnrOneKernelMaxD;
  // Counters everywhere: (seed_ptr, step_ptr, seed, step, draws, draw, stream, ids): a pointer is 0
  // for a value passed by value; the Philox step is step * draws + draw.
  m.def("fill_noise",
        [](uintptr_t out, int64_t B, int64_t D, int64_t elem_offset, int kind, uintptr_t seed_ptr,
           uintptr_t step_ptr, uint64_t seed, int64_t step, uint32_t stream, uintptr_t ids,
           uintptr_t cuda_stream) {
          check(fill_noise(ptr<float>(out), B, D, elem_offset, kind,
                           counter(seed_ptr, step_ptr, seed, step, 1, 0, stream, ids),
                           reinterpret_cast<cudaStream_t>(cuda_stream)),
                "fill_noise");
        });
  // coefficients: (coefs, row_ptr, row_stride, k_stride, b_stride), see CoefArgs; flag: 0 or an int64*
  m.def("fused_update",
        [](uintptr_t out, uintptr_t x, int x_dtype, const std::vector<uintptr_t>& term_ptrs,
           const std::vector<int>& term_dtypes, uintptr_t coefs, uintptr_t row_ptr, int64_t row_stride,
           int64_t k_stride, int64_t b_stride, bool with_noise, int64_t B, int64_t D, uintptr_t seed_ptr,
           uintptr_t step_ptr, uint64_t seed, int64_t step, int64_t draws, int64_t draw, uint32_t stream,
           uintptr_t ids, uintptr_t flag, uintptr_t cuda_stream) {
          if (term_ptrs.size() > kMaxTerms || term_ptrs.size() != term_dtypes.size()) {
            throw std::invalid_argument("terms: at most 4, one dtype each");
          }
          Terms terms{};
          terms.count = static_cast<int>(term_ptrs.size());
          for (int t = 0; t < terms.count; ++t) {
            terms.ptr[t] = ptr<const void>(term_ptrs[t]);
            terms.dtype[t] = term_dtypes[t];
          }
          check(scorefast_cuda::fused_update(ptr<void>(out), ptr<const void>(x), x_dtype, terms,
                                             coef_args(coefs, row_ptr, row_stride, k_stride, b_stride),
                                             with_noise, B, D,
                                             counter(seed_ptr, step_ptr, seed, step, draws, draw, stream, ids),
                                             ptr<int64_t>(flag), reinterpret_cast<cudaStream_t>(cuda_stream)),
                "fused_update");
        });
  m.def("sumsq_norms",
        [](uintptr_t out, uintptr_t partial, uintptr_t t, int t_dtype, bool with_noise, int64_t B,
           int64_t D, uintptr_t seed_ptr, uintptr_t step_ptr, uint64_t seed, int64_t step,
           uint32_t stream, uintptr_t ids, uintptr_t cuda_stream) {
          check(scorefast_cuda::sumsq_norms(ptr<float>(out), ptr<float>(partial), ptr<const void>(t),
                                            t_dtype, with_noise, B, D,
                                            counter(seed_ptr, step_ptr, seed, step, 1, 0, stream, ids),
                                            reinterpret_cast<cudaStream_t>(cuda_stream)),
                "sumsq_norms");
        });
  // alpha: (alpha, row_ptr, row_stride, b_stride) (coefficient 0 of CoefArgs); scratch:
  // snr_scratch_floats(B, D) floats (0: none needed)
  m.def("snr_langevin_step",
        [](uintptr_t out, uintptr_t eps, uintptr_t x, int x_dtype, uintptr_t score, int score_dtype,
           uintptr_t alpha, uintptr_t row_ptr, int64_t row_stride, int64_t b_stride, float two_snr2, int64_t B,
           int64_t D, uintptr_t seed_ptr, uintptr_t step_ptr, uint64_t seed, int64_t step, int64_t draws,
           int64_t draw, uint32_t stream, uintptr_t ids, uintptr_t flag, uintptr_t scratch, uintptr_t cuda_stream) {
          check(scorefast_cuda::snr_langevin_step(
                    ptr<void>(out), ptr<float>(eps), ptr<const void>(x), x_dtype, ptr<const void>(score),
                    score_dtype, coef_args(alpha, row_ptr, row_stride, 0, b_stride), two_snr2, B, D,
                    counter(seed_ptr, step_ptr, seed, step, draws, draw, stream, ids), ptr<int64_t>(flag),
                    ptr<float>(scratch), reinterpret_cast<cudaStream_t>(cuda_stream)),
                "snr_langevin_step");
        });
  // the adaptive solvers' per-attempt kernels: pointers as ints (0 for none), see launchers.h
  m.def("scaled_sumsq",
        [](uintptr_t out, uintptr_t partial, uintptr_t e, uintptr_t y, uintptr_t y2, int dtype, int64_t B, int64_t D,
           float rtol, float atol, int mode, uintptr_t cuda_stream) {
          check(scorefast_cuda::scaled_sumsq(ptr<float>(out), ptr<float>(partial), ptr<const void>(e),
                                             ptr<const void>(y), ptr<const void>(y2), dtype, B, D, rtol, atol, mode,
                                             reinterpret_cast<cudaStream_t>(cuda_stream)),
                "scaled_sumsq");
        });
  m.def("step_control",
        [](uintptr_t accept, uintptr_t state, uintptr_t sumsq, bool sumsq_f64, uintptr_t t_end, uintptr_t direction,
           uintptr_t n_ptr, int64_t n, uintptr_t c_stage, int64_t S, uintptr_t stage_t, uintptr_t base,
           uintptr_t mult, int64_t R, uintptr_t table, bool table_f64, int64_t B, int64_t numel, uintptr_t batch_err,
           int rule, double safety, double exponent, double e_min_grow, double e_min_retry, double e_max,
           bool advance, uintptr_t cuda_stream) {
          check(scorefast_cuda::step_control(
                    ptr<bool>(accept), ptr<double>(state), ptr<const void>(sumsq), sumsq_f64, ptr<const double>(t_end),
                    ptr<const double>(direction), ptr<const int64_t>(n_ptr), n, ptr<const double>(c_stage), S,
                    ptr<double>(stage_t), ptr<const double>(base), ptr<const double>(mult), R, ptr<void>(table),
                    table_f64, B, numel, ptr<const double>(batch_err), rule, safety, exponent, e_min_grow,
                    e_min_retry, e_max, advance, reinterpret_cast<cudaStream_t>(cuda_stream)),
                "step_control");
        });
  m.def("select_rows",
        [](uintptr_t out, uintptr_t news, uintptr_t olds, uintptr_t mask, int64_t B, int64_t row_bytes,
           uintptr_t cuda_stream) {
          check(scorefast_cuda::select_rows(ptr<void>(out), ptr<const void>(news), ptr<const void>(olds),
                                            ptr<const bool>(mask), B, row_bytes,
                                            reinterpret_cast<cudaStream_t>(cuda_stream)),
                "select_rows");
        });
  m.def("sde_coefs",
        [](uintptr_t out, bool out_f64, uintptr_t h, uintptr_t times, uintptr_t a, uintptr_t b, uintptr_t fa,
           uintptr_t fb, int64_t B, uintptr_t cuda_stream) {
          check(scorefast_cuda::sde_coefs(ptr<void>(out), out_f64, ptr<const double>(h), ptr<const double>(times),
                                          ptr<const double>(a), ptr<const double>(b), ptr<const double>(fa),
                                          ptr<const double>(fb), B, reinterpret_cast<cudaStream_t>(cuda_stream)),
                "sde_coefs");
        });
  m.def("snr_scratch_floats", &snr_scratch_floats);
  m.def("norm_tiles", &norm_tiles);
  m.def("philox_words", [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
    const auto w = scorefast::philox4x32_10(c0, c1, c2, c3, k0, k1);
    return std::vector<uint32_t>{w.w[0], w.w[1], w.w[2], w.w[3]};
  });
}
