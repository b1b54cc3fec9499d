// CPU kernels of scorefast, written once on at::vec and compiled per instruction set.
//
// Each capability_*.cpp defines SF_CAPABILITY_NAME and includes this file; setup.py builds it
// into scorefast._C_<capability> with that ISA's flags, and scorefast/backends/cpu.py loads
// the one matching torch.backends.cpu.get_cpu_capability().
//
// Batch invariance (DESIGN.md): work is split into tiles of kTile elements counted from each
// sample's first element; every element goes through the same vector path (masked tails via
// loadu/store with a count, never a scalar libm tail), and per-sample sums add tile partials
// in tile order.  Nothing depends on B, the thread count or the position of a sample.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "scorefast/philox.h"

namespace scorefast_cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kTile = 1024;               // elements per tile; a multiple of 4 and of Vec::size()
constexpr int64_t kMaxGroups = kTile / 4 + 2;  // Philox groups a tile can touch
constexpr int64_t kPackedRows = 64;            // fused_update packs rows this short into flat spans

enum NoiseKind : int64_t { kUniform = 0, kNormal = 1, kRademacher = 2 };

struct Counter {
  uint64_t seed;
  uint32_t step;
  uint32_t stream;
};

// Philox words in structure-of-arrays form, so the compiler vectorises the group loop
// (lane-independent integer arithmetic: exact whatever the vector width).
struct GroupWords {
  alignas(64) std::array<uint32_t, kMaxGroups> w0, w1, w2, w3;
};

#if defined(__AVX2__)
// Philox4x32-10 on 2 x 8 lanes of AVX2 (the avx2 and avx512 builds): the same integer arithmetic
// as scorefast::philox4x32_10, so the words are identical; two independent vectors per round
// hide the multiply latency.  Lanes k .. k+15 of (group, sample) -> out words.
inline void mulhilo_avx2(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // 64-bit products of lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // of lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_mullo_epi32(a, m);
}

constexpr int64_t kPhiloxLanes = 16;

inline void philox_16_lanes(const uint32_t* group, const uint32_t* sample, uint32_t step, uint32_t stream,
                            uint32_t k0, uint32_t k1, uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(scorefast::kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(scorefast::kPhiloxM1));
  __m256i c0[2], c1[2], c2[2], c3[2];
  for (int v = 0; v < 2; ++v) {
    c0[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + 8 * v));
    c1[v] = _mm256_set1_epi32(static_cast<int>(step));
    c2[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sample + 8 * v));
    c3[v] = _mm256_set1_epi32(static_cast<int>(stream));
  }
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < 2; ++v) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_avx2(c0[v], m0, hi0, lo0);
      mulhilo_avx2(c2[v], m1, hi1, lo1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), key0);
      c1[v] = lo1;
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), key1);
      c3[v] = lo0;
    }
    k0 += scorefast::kPhiloxW0;
    k1 += scorefast::kPhiloxW1;
  }
  for (int v = 0; v < 2; ++v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + 8 * v), c0[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + 8 * v), c1[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + 8 * v), c2[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3 + 8 * v), c3[v]);
  }
}
#endif

// Words of groups g0 .. g0+ng-1 of rows b0 .. b0+nb-1, index r * ng + g: one loop over all
// (row, group) pairs, so rows of a few elements still fill the vector lanes.  ids null: arange(B).
void group_words(const Counter& c, const int64_t* ids, int64_t b0, int64_t nb, int64_t g0, int64_t ng,
                 GroupWords& out) {
  const uint32_t k0 = static_cast<uint32_t>(c.seed), k1 = static_cast<uint32_t>(c.seed >> 32);
  alignas(64) std::array<uint32_t, kMaxGroups> group, sample;
  const int64_t total = nb * ng;
  if (ng == 1) {  // rows of at most 4 elements: one group a row
    for (int64_t r = 0; r < nb; ++r) {
      group[r] = static_cast<uint32_t>(g0);
      sample[r] = static_cast<uint32_t>(ids ? ids[b0 + r] : b0 + r);
    }
  } else {
    for (int64_t r = 0; r < nb; ++r) {
      for (int64_t g = 0; g < ng; ++g) {
        group[r * ng + g] = static_cast<uint32_t>(g0 + g);
        sample[r * ng + g] = static_cast<uint32_t>(ids ? ids[b0 + r] : b0 + r);
      }
    }
  }
  int64_t k = 0;
#if defined(__AVX2__)
  for (; k + kPhiloxLanes <= total; k += kPhiloxLanes) {
    philox_16_lanes(group.data() + k, sample.data() + k, c.step, c.stream, k0, k1, out.w0.data() + k,
                    out.w1.data() + k, out.w2.data() + k, out.w3.data() + k);
  }
#endif
#pragma omp simd
  for (int64_t i = k; i < total; ++i) {
    const scorefast::Words4 w = scorefast::philox4x32_10(group[i], c.step, sample[i], c.stream, k0, k1);
    out.w0[i] = w.w[0];
    out.w1[i] = w.w[1];
    out.w2[i] = w.w[2];
    out.w3[i] = w.w[3];
  }
}

// Noise for rows b0 .. b0+nb-1 (sample ids ids[b]), elements [first, first + n) of each; row r is
// written at out + r * out_stride.  nb * groups-per-row <= kMaxGroups.  Rows share the vector
// Box-Muller calls: lanes are independent, so no value depends on which rows are pooled.
void noise_rows(const Counter& c, const int64_t* ids, int64_t b0, int64_t nb, int64_t first, int64_t n, int64_t kind,
                float* out, int64_t out_stride) {
  const int64_t g0 = first / 4;
  const int64_t ng = (first + n - 1) / 4 - g0 + 1;
  GroupWords gw;
  group_words(c, ids, b0, nb, g0, ng, gw);
  if (kind == kRademacher || kind == kUniform) {
    const uint32_t* words[4] = {gw.w0.data(), gw.w1.data(), gw.w2.data(), gw.w3.data()};
    const auto fill = [&](auto to_float) {
      for (int64_t r = 0; r < nb; ++r) {
        float* o = out + r * out_stride;
        int64_t i = 0;
        if (first % 4 == 0) {  // whole groups: element 4g + j is word j of group g
          const int64_t base = r * ng;
          for (; i + 4 <= n; i += 4) {
            const int64_t g = base + i / 4;
            o[i] = to_float(words[0][g]);
            o[i + 1] = to_float(words[1][g]);
            o[i + 2] = to_float(words[2][g]);
            o[i + 3] = to_float(words[3][g]);
          }
        }
        for (; i < n; ++i) {
          const int64_t e = first + i;
          o[i] = to_float(words[e % 4][r * ng + e / 4 - g0]);
        }
      }
    };
    if (kind == kRademacher) {
      fill([](uint32_t w) { return scorefast::word_to_rademacher(w); });
    } else {
      fill([](uint32_t w) { return scorefast::word_to_uniform(w); });
    }
    return;
  }
  // Box-Muller on pairs (w0, w1) -> elements 4g, 4g+1 and (w2, w3) -> 4g+2, 4g+3.  Rows that take
  // at most the first two elements of one group (D <= 2) skip the second pair.  Pair p of group g
  // is index ppg * g + p.
  const int64_t ppg = (ng == 1 && first % 4 + n <= 2) ? 1 : 2;
  alignas(64) std::array<float, 2 * kMaxGroups> ua, ub, cos_out, sin_out;
  const int64_t groups = nb * ng;
  for (int64_t g = 0; g < groups; ++g) {
    ua[ppg * g] = scorefast::word_to_uniform(gw.w0[g]);
    ub[ppg * g] = scorefast::word_to_uniform(gw.w1[g]);
  }
  if (ppg == 2) {
    for (int64_t g = 0; g < groups; ++g) {
      ua[2 * g + 1] = scorefast::word_to_uniform(gw.w2[g]);
      ub[2 * g + 1] = scorefast::word_to_uniform(gw.w3[g]);
    }
  }
  const int64_t npairs = ppg * groups;
  const Vec min_u(scorefast::kMinUniform), minus_two(-2.0f), two_pi(scorefast::kTwoPi);
  for (int64_t p = 0; p < npairs; p += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), npairs - p);
    const Vec a = at::vec::maximum(Vec::loadu(ua.data() + p, count), min_u);
    const Vec theta = Vec::loadu(ub.data() + p, count) * two_pi;
    const Vec r = (a.log() * minus_two).sqrt();
    (r * theta.cos()).store(cos_out.data() + p, count);
    (r * theta.sin()).store(sin_out.data() + p, count);
  }
  for (int64_t r = 0; r < nb; ++r) {
    float* o = out + r * out_stride;
    int64_t i = 0;
    if (first % 4 == 0) {  // whole groups: elements 4g .. 4g+3 are pairs ppg*g (cos, sin), ppg*g + 1
      const int64_t base = ppg * r * ng;
      if (ppg == 1) {
        o[0] = cos_out[base];
        if (n == 2) o[1] = sin_out[base];
        i = n;
      }
      for (; i + 4 <= n; i += 4) {
        const int64_t pair = base + i / 2;
        o[i] = cos_out[pair];
        o[i + 1] = sin_out[pair];
        o[i + 2] = cos_out[pair + 1];
        o[i + 3] = sin_out[pair + 1];
      }
    }
    for (; i < n; ++i) {
      const int64_t e = first + i;
      const int64_t pair = ppg * (r * ng + e / 4 - g0) + (e % 4) / 2;
      o[i] = (e % 2 == 0) ? cos_out[pair] : sin_out[pair];
    }
  }
}

// Reads n elements of a float/half/bfloat16 row as fp32: the row itself when it is fp32.
const float* as_float(const void* base, at::ScalarType dtype, int64_t offset, int64_t n,
                      float* buf) {
  switch (dtype) {
    case at::kFloat:
      return static_cast<const float*>(base) + offset;
    case at::kHalf: {
      const auto* p = static_cast<const at::Half*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
      return buf;
    }
    case at::kBFloat16: {
      const auto* p = static_cast<const at::BFloat16*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
      return buf;
    }
    default:
      TORCH_CHECK(false, "scorefast cpu kernels take float32, float16 or bfloat16, got ", dtype);
  }
}

void store_from_float(const float* src, void* base, at::ScalarType dtype, int64_t offset, int64_t n) {
  switch (dtype) {
    case at::kFloat:
      std::copy(src, src + n, static_cast<float*>(base) + offset);
      return;
    case at::kHalf: {
      auto* p = static_cast<at::Half*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<at::Half>(src[i]);
      return;
    }
    case at::kBFloat16: {
      auto* p = static_cast<at::BFloat16*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<at::BFloat16>(src[i]);
      return;
    }
    default:
      TORCH_CHECK(false, "scorefast cpu kernels write float32, float16 or bfloat16, got ", dtype);
  }
}

void check_rows(const at::Tensor& t, int64_t B, int64_t D, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.dim() == 2 && t.size(0) == B && t.size(1) == D, name,
              " must be a contiguous [B, D] tensor");
}

// Elements a thread should own before a parallel region pays off.
constexpr int64_t kParallelGrainElements = 16384;

// Rows pooled into one block: for D < kTile as many whole rows as one tile's Philox groups hold
// (elem_offset shifts the group alignment); else 1 row, split into tiles of kTile elements.
int64_t rows_per_block(int64_t D, int64_t elem_offset) {
  if (D >= kTile) return 1;
  const int64_t groups_per_row = (elem_offset + D - 1) / 4 - elem_offset / 4 + 1;
  return std::max<int64_t>(1, (kTile / 4) / groups_per_row);
}

// Runs fn(b0, nb, first, n) over blocks of nb rows x elements [first, first + n), in parallel over
// blocks.  The split only decides which thread runs a block, never how an element is computed.
template <typename Fn>
void for_each_block(int64_t B, int64_t D, int64_t elem_offset, const Fn& fn) {
  const int64_t tiles = (D + kTile - 1) / kTile;
  const int64_t R = rows_per_block(D, elem_offset);
  const int64_t row_blocks = (B + R - 1) / R;
  const int64_t job_elems = std::max<int64_t>(1, R * std::min(D, kTile));
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / job_elems);
  at::parallel_for(0, row_blocks * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b0 = (job / tiles) * R;
      const int64_t first = (job % tiles) * kTile;
      fn(b0, std::min(R, B - b0), first, std::min<int64_t>(kTile, D - first));
    }
  });
}

// out[b, e] = noise(seed, step, ids[b], stream, elem_offset + e), out fp32 [B, D].
void fill_noise(at::Tensor out, const at::Tensor& ids, uint64_t seed, int64_t step, int64_t stream,
                int64_t elem_offset, int64_t kind) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out must be float32");
  const int64_t B = out.size(0), D = out.size(1);
  check_rows(out, B, D, "out");
  const Counter c{seed, static_cast<uint32_t>(step), static_cast<uint32_t>(stream)};
  const int64_t* id = ids.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for_each_block(B, D, elem_offset, [&](int64_t b0, int64_t nb, int64_t first, int64_t n) {
    noise_rows(c, id, b0, nb, elem_offset + first, n, kind, o + b0 * D + first, D);
  });
}

// Whether any of the n values stored at base + offset (as dtype) is not finite: v * 0 is 0 for a
// finite v and NaN otherwise, so one multiply-add per element and a look at the lanes at the end.
bool any_nonfinite(const float* acc, const void* base, at::ScalarType dtype, int64_t offset, int64_t n,
                   float* buf) {
  const float* v = dtype == at::kFloat ? acc : as_float(base, dtype, offset, n, buf);  // fp16 may overflow
  Vec probe(0.0f);
  const Vec zero(0.0f);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
    probe = at::vec::fmadd(Vec::loadu(v + i, cnt), zero, probe);
  }
  alignas(64) float lanes[Vec::size()];
  probe.store(lanes);
  bool bad = false;
  for (int64_t l = 0; l < Vec::size(); ++l) bad |= lanes[l] != lanes[l];
  return bad;
}

// Where a launch's coefficients live: coefficient k of sample b is base[k * k_stride + b * b_stride]
// (a [K, C] matrix: k_stride C, b_stride C > 1; a table row: base at the row, k_stride 1, b_stride 0).
struct CoefSource {
  const float* base;
  int64_t k_stride;
  int64_t b_stride;
  float operator()(int64_t k, int64_t b) const { return base[k * k_stride + b * b_stride]; }
};

// out = coef(0)*x + sum_t coef(1+t)*terms[t] + coef(K-1)*z with K = T + 2 coefficients from `coef`.
// Returns whether a stored value is not finite (checked only when check_finite).
bool fused_update_core(at::Tensor& out, const at::Tensor& x, const std::vector<at::Tensor>& terms, CoefSource coef,
                       const int64_t* id, uint64_t seed, int64_t step, int64_t stream, bool with_noise,
                       bool check_finite) {
  const int64_t B = x.size(0), D = x.size(1);
  check_rows(x, B, D, "x");
  check_rows(out, B, D, "out");
  for (const auto& t : terms) check_rows(t, B, D, "terms[i]");
  const int64_t T = static_cast<int64_t>(terms.size());
  const Counter c{seed, static_cast<uint32_t>(step), static_cast<uint32_t>(stream)};
  std::vector<const void*> term_ptr;
  std::vector<at::ScalarType> term_dtype;
  for (const auto& t : terms) {
    term_ptr.push_back(t.data_ptr());
    term_dtype.push_back(t.scalar_type());
  }
  const void* xp = x.data_ptr();
  void* op = out.data_ptr();
  const auto xdt = x.scalar_type(), odt = out.scalar_type();
  std::atomic<bool> bad{false};
  for_each_block(B, D, 0, [&](int64_t b0, int64_t nb, int64_t first, int64_t n) {
    alignas(64) std::array<float, kTile> xbuf, tbuf, zbuf, acc;
    if (with_noise) noise_rows(c, id, b0, nb, first, n, kNormal, zbuf.data(), n);
    if (n == D && D % Vec::size() != 0 && D <= kPackedRows) {
      // Short rows (low-dimensional data): the block's whole rows are one contiguous span, done as
      // flat vectors with each row's coefficient repeated over its elements.  Every element sees
      // the same lane-wise multiply and fmadds as in the row path below, so results are bitwise
      // the same; it only saves the masked loads a short row costs per term.
      const int64_t m = nb * D;
      alignas(64) std::array<float, kTile> cbuf;
      const auto spread = [&](int64_t k) {
        for (int64_t r = 0; r < nb; ++r) std::fill_n(cbuf.data() + r * D, D, coef(k, b0 + r));
      };
      const float* xv = as_float(xp, xdt, b0 * D, m, xbuf.data());
      spread(0);
      for (int64_t i = 0; i < m; i += Vec::size()) {
        const int64_t cnt = std::min<int64_t>(Vec::size(), m - i);
        (Vec::loadu(cbuf.data() + i, cnt) * Vec::loadu(xv + i, cnt)).store(acc.data() + i, cnt);
      }
      const auto add = [&](int64_t k, const float* v) {  // acc += coefficient k (spread) * v
        spread(k);
        for (int64_t i = 0; i < m; i += Vec::size()) {
          const int64_t cnt = std::min<int64_t>(Vec::size(), m - i);
          at::vec::fmadd(Vec::loadu(cbuf.data() + i, cnt), Vec::loadu(v + i, cnt), Vec::loadu(acc.data() + i, cnt))
              .store(acc.data() + i, cnt);
        }
      };
      for (int64_t t = 0; t < T; ++t) add(1 + t, as_float(term_ptr[t], term_dtype[t], b0 * D, m, tbuf.data()));
      if (with_noise) add(T + 1, zbuf.data());
      store_from_float(acc.data(), op, odt, b0 * D, m);
      if (check_finite && any_nonfinite(acc.data(), op, odt, b0 * D, m, tbuf.data())) bad = true;
      return;
    }
    for (int64_t b = b0; b < b0 + nb; ++b) {
      const float* zv = zbuf.data() + (b - b0) * n;
      const float* xv = as_float(xp, xdt, b * D + first, n, xbuf.data());
      const Vec xc(coef(0, b));
      for (int64_t i = 0; i < n; i += Vec::size()) {
        const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
        (xc * Vec::loadu(xv + i, cnt)).store(acc.data() + i, cnt);
      }
      const auto add = [&](int64_t k, const float* v) {  // acc += coefficient k of row b * v
        const Vec ck(coef(k, b));
        for (int64_t i = 0; i < n; i += Vec::size()) {
          const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
          at::vec::fmadd(ck, Vec::loadu(v + i, cnt), Vec::loadu(acc.data() + i, cnt)).store(acc.data() + i, cnt);
        }
      };
      for (int64_t t = 0; t < T; ++t) add(1 + t, as_float(term_ptr[t], term_dtype[t], b * D + first, n, tbuf.data()));
      if (with_noise) add(T + 1, zv);
      store_from_float(acc.data(), op, odt, b * D + first, n);
      if (check_finite && any_nonfinite(acc.data(), op, odt, b * D + first, n, tbuf.data())) bad = true;
    }
  });
  return bad;
}

// The non-finite flag (an int64 scalar starting at -1) records the step counter n the first time.
void record_nonfinite(const c10::optional<at::Tensor>& flag, bool bad, int64_t n) {
  if (!bad || !flag.has_value() || !flag->defined()) return;
  int64_t* f = flag->data_ptr<int64_t>();
  if (*f == -1) *f = n;
}

void check_flag(const c10::optional<at::Tensor>& flag) {
  if (!flag.has_value() || !flag->defined()) return;
  TORCH_CHECK(flag->scalar_type() == at::kLong && flag->numel() == 1, "flag must be a 0-d int64 tensor");
}

// Elements from a tensor's first to its last (a strided view spans more than its numel).
int64_t span_of(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
  return span;
}

const int64_t* ids_or_null(const c10::optional<at::Tensor>& ids) {
  return ids.has_value() && ids->defined() ? ids->data_ptr<int64_t>() : nullptr;
}

// coefs: fp32 [T + 2, B] or [T + 2, 1] tensor.
void fused_update(at::Tensor out, const at::Tensor& x, const std::vector<at::Tensor>& terms,
                  const at::Tensor& coefs, const at::Tensor& ids, uint64_t seed, int64_t step,
                  int64_t stream, bool with_noise) {
  const int64_t B = x.size(0), T = static_cast<int64_t>(terms.size());
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.is_contiguous() && coefs.dim() == 2 &&
                  coefs.size(0) == T + 2 && (coefs.size(1) == B || coefs.size(1) == 1),
              "coefs must be float32 [len(terms) + 2, B or 1]");
  const CoefSource coef{coefs.data_ptr<float>(), coefs.size(1), coefs.size(1) > 1 ? 1 : 0};
  fused_update_core(out, x, terms, coef, ids.data_ptr<int64_t>(), seed, step, stream, with_noise, false);
}

// The general form (the step ops): coefficient k of sample b at coefs[offset + k * k_stride + b *
// b_stride] (a table row or a [K, C] matrix), ids optional (arange(B)), the Philox step given, and
// the non-finite flag set to the step counter n.
void fused_update_step(at::Tensor out, const at::Tensor& x, const std::vector<at::Tensor>& terms,
                       const at::Tensor& coefs, int64_t offset, int64_t k_stride, int64_t b_stride,
                       const c10::optional<at::Tensor>& ids, uint64_t seed, int64_t philox_step, int64_t stream,
                       bool with_noise, const c10::optional<at::Tensor>& flag, int64_t n) {
  const int64_t B = x.size(0), T = static_cast<int64_t>(terms.size());
  TORCH_CHECK(coefs.scalar_type() == at::kFloat, "coefs must be float32");
  const int64_t last = offset + (T + 1) * k_stride + (B > 0 ? B - 1 : 0) * b_stride;
  TORCH_CHECK(offset >= 0 && last < span_of(coefs), "coefficient indices out of range");
  check_flag(flag);
  const CoefSource coef{coefs.data_ptr<float>() + offset, k_stride, b_stride};
  const bool bad = fused_update_core(out, x, terms, coef, ids_or_null(ids), seed, philox_step, stream, with_noise,
                                     flag.has_value() && flag->defined());
  record_nonfinite(flag, bad, n);
}

// The same with T + 2 coefficients shared by the batch as host numbers (rounded to fp32 as a
// float32 tensor of them would be): the samplers' eager path, without a coefficient tensor.
void fused_update_scalars(at::Tensor out, const at::Tensor& x, const std::vector<at::Tensor>& terms,
                          const std::vector<double>& coefs, const at::Tensor& ids, uint64_t seed, int64_t step,
                          int64_t stream, bool with_noise) {
  TORCH_CHECK(coefs.size() == terms.size() + 2, "coefs must hold len(terms) + 2 numbers");
  std::vector<float> cf(coefs.begin(), coefs.end());
  fused_update_core(out, x, terms, CoefSource{cf.data(), 1, 0}, ids.data_ptr<int64_t>(), seed, step, stream,
                    with_noise, false);
}

// Sum of squares of one tile's n values, lanes accumulated from the tile start, then the
// lanes added in lane order.
float tile_sumsq(const float* v, int64_t n) {
  Vec acc(0.0f);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
    const Vec a = Vec::loadu(v + i, cnt);
    acc = at::vec::fmadd(a, a, acc);
  }
  alignas(64) float lanes[Vec::size()];
  acc.store(lanes);
  float s = 0.0f;
  for (int64_t l = 0; l < Vec::size(); ++l) s += lanes[l];
  return s;
}

// o[r] = row r's tile partials (partial [rows, tiles]) added in tile order: the last level of the
// per-sample sums' fixed tree, shared by every kernel that sums rows by tiles.
void add_tile_partials(const std::vector<float>& partial, int64_t rows, int64_t tiles, float* o) {
  for (int64_t r = 0; r < rows; ++r) {
    float s = 0.0f;
    for (int64_t k = 0; k < tiles; ++k) s += partial[r * tiles + k];
    o[r] = s;
  }
}

// Per-sample sums of squares into o [2 * B]: row 0 of t (when given), row 1 of the normal noise z
// of (seed, step, stream, ids) with elem offset 0 (when with_noise); z is never stored.  Tiles of
// kTile elements from each sample's first one, their partials added in tile order.
void sumsq_rows(float* o, const void* tp, at::ScalarType tdt, const int64_t* id, int64_t B, int64_t D,
                uint64_t seed, int64_t step, int64_t stream, bool with_noise) {
  const int64_t tiles = (D + kTile - 1) / kTile;
  std::vector<float> partial(static_cast<size_t>(2 * B * tiles), 0.0f);
  const Counter c{seed, static_cast<uint32_t>(step), static_cast<uint32_t>(stream)};
  for_each_block(B, D, 0, [&](int64_t b0, int64_t nb, int64_t first, int64_t n) {
    alignas(64) std::array<float, kTile> buf, zbuf;
    if (with_noise) noise_rows(c, id, b0, nb, first, n, kNormal, zbuf.data(), n);
    for (int64_t b = b0; b < b0 + nb; ++b) {
      const int64_t slot = b * tiles + first / kTile;
      if (tp) partial[slot] = tile_sumsq(as_float(tp, tdt, b * D + first, n, buf.data()), n);
      if (with_noise) partial[B * tiles + slot] = tile_sumsq(zbuf.data() + (b - b0) * n, n);
    }
  });
  add_tile_partials(partial, 2 * B, tiles, o);
}

// out fp32 [2, B]: row 0 = sum of squares of t per sample (0 when t is undefined), row 1 = the
// same of the normal noise z of (seed, step, stream, ids) with elem offset 0.  z is never stored.
void sumsq_norms(at::Tensor out, const c10::optional<at::Tensor>& t, const at::Tensor& ids,
                 int64_t D, uint64_t seed, int64_t step, int64_t stream, bool with_noise) {
  const int64_t B = ids.size(0);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == 2 * B,
              "out must be float32 [2, B]");
  const bool has_t = t.has_value() && t->defined();
  if (has_t) check_rows(*t, B, D, "t");
  sumsq_rows(out.data_ptr<float>(), has_t ? t->data_ptr() : nullptr, has_t ? t->scalar_type() : at::kFloat,
             ids.data_ptr<int64_t>(), B, D, seed, step, stream, with_noise);
}

#include "adaptive_impl.h"
#include "train_impl.h"

// score_sde's Langevin corrector with per-sample norms: eps_b = (two_snr2 * alpha_b) * (|z_b|^2 /
// |score_b|^2) in fp32 (0 where the score norm is not > 0), out = x + eps*score + sqrt(2 eps)*z.
// alpha_b = alpha[alpha_offset + b * alpha_b_stride]; eps: fp32 [B].  Norms as sumsq_norms.
void snr_langevin_step(at::Tensor out, at::Tensor eps, const at::Tensor& x, const at::Tensor& score,
                       const at::Tensor& alpha, int64_t alpha_offset, int64_t alpha_b_stride, double two_snr2,
                       const c10::optional<at::Tensor>& ids, uint64_t seed, int64_t philox_step, int64_t stream,
                       const c10::optional<at::Tensor>& flag, int64_t n) {
  const int64_t B = x.size(0), D = x.size(1);
  check_rows(score, B, D, "score");
  TORCH_CHECK(eps.scalar_type() == at::kFloat && eps.is_contiguous() && eps.numel() == B, "eps must be float32 [B]");
  TORCH_CHECK(alpha.scalar_type() == at::kFloat, "alpha must be float32");
  TORCH_CHECK(alpha_offset >= 0 && alpha_offset + (B > 0 ? B - 1 : 0) * alpha_b_stride < span_of(alpha),
              "alpha index out of range");
  check_flag(flag);
  const int64_t* id = ids_or_null(ids);
  std::vector<float> sums(static_cast<size_t>(2 * B));
  sumsq_rows(sums.data(), score.data_ptr(), score.scalar_type(), id, B, D, seed, philox_step, stream, true);
  const float c2 = static_cast<float>(two_snr2);
  const float* a = alpha.data_ptr<float>() + alpha_offset;
  float* e = eps.data_ptr<float>();
  std::vector<float> cf(static_cast<size_t>(3 * B));
  for (int64_t b = 0; b < B; ++b) {
    const float g2 = sums[b], z2 = sums[B + b];
    const float step_size = g2 > 0.0f ? (c2 * a[b * alpha_b_stride]) * (z2 / g2) : 0.0f;
    e[b] = step_size;
    cf[b] = 1.0f;
    cf[B + b] = step_size;
    cf[2 * B + b] = std::sqrt(2.0f * step_size);
  }
  if (D == 0) return;
  const bool bad = fused_update_core(out, x, {score}, CoefSource{cf.data(), B, 1}, id, seed, philox_step, stream,
                                     true, flag.has_value() && flag->defined());
  record_nonfinite(flag, bad, n);
}

// Philox words for explicit counters: the known-answer check of the shared header.
std::vector<uint32_t> philox_words(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                   uint32_t k1) {
  const auto w = scorefast::philox4x32_10(c0, c1, c2, c3, k0, k1);
  return {w.w[0], w.w[1], w.w[2], w.w[3]};
}

}  // namespace scorefast_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "scorefast CPU kernels (" SF_CAPABILITY_NAME ")";
  m.attr("capability") = SF_CAPABILITY_NAME;
  m.attr("vector_width") = scorefast_cpu::Vec::size();
  m.attr("tile") = scorefast_cpu::kTile;
  m.def("fill_noise", &scorefast_cpu::fill_noise);
  m.def("fused_update", &scorefast_cpu::fused_update);
  m.def("fused_update_scalars", &scorefast_cpu::fused_update_scalars);
  m.def("fused_update_step", &scorefast_cpu::fused_update_step);
  m.def("snr_langevin_step", &scorefast_cpu::snr_langevin_step);
  m.def("sumsq_norms", &scorefast_cpu::sumsq_norms);
  m.def("scaled_sumsq", &scorefast_cpu::scaled_sumsq);
  m.def("step_control", &scorefast_cpu::step_control);
  m.def("select_rows", &scorefast_cpu::select_rows);
  m.def("sde_coefs", &scorefast_cpu::sde_coefs);
  m.def("clip_grad_norm", &scorefast_cpu::clip_grad_norm);
  m.def("dsm_perturb_vp", &scorefast_cpu::dsm_perturb_vp);
  m.def("eps_dsm_residual", &scorefast_cpu::eps_dsm_residual);
  m.def("philox_words", &scorefast_cpu::philox_words);
}
