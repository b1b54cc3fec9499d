// Philox4x32-10 and the noise contract of DESIGN.md ("Noise: one counter-based stream").
//
// One definition used by the CPU C++ kernels and the CUDA kernels; kernels/philox.py mirrors
// it line for line for Triton.  No fast-math: the uniform map and Box-Muller use plain fp32
// operations and precise logf/sqrtf/sinf/cosf (on the CPU the vectorised at::vec versions).
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define SF_HD __host__ __device__ __forceinline__
#else
#define SF_HD inline
#endif

namespace scorefast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
// Triton's uint_to_uniform_float scale, 2^-31 rounded to fp32.
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1e-7f;

struct Words4 {
  uint32_t w[4];
};

SF_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox4x32 with 10 rounds: counter (c0..c3), key (k0, k1).
SF_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                           uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Words4{{c0, c1, c2, c3}};
}

// The contract's counter for (element group, step, sample id, stream) and key from a 64-bit seed.
SF_HD Words4 contract_words(uint64_t seed, uint32_t group, uint32_t step, uint32_t sample_id,
                            uint32_t stream) {
  return philox4x32_10(group, step, sample_id, stream, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// u = float32(x) * 2^-31 where x is the word as int32 and negative x becomes -x-1.
SF_HD float word_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) x = -x - 1;
  return static_cast<float>(x) * kUniformScale;
}

// +1 if word < 2^31 else -1, without a branch on random bits.
SF_HD float word_to_rademacher(uint32_t word) { return 1.0f - 2.0f * static_cast<float>(word >> 31); }

}  // namespace scorefast

namespace scorefast {
// Box-Muller on one pair of uniforms: r = sqrt(-2 ln max(1e-7, u0)), theta = 2 pi u1.
// Scalar form (CUDA); the CPU kernels run the same formula on at::vec lanes.
SF_HD void box_muller(float u0, float u1, float* n0, float* n1) {
  const float r = sqrtf(-2.0f * logf(u0 > kMinUniform ? u0 : kMinUniform));
  const float theta = kTwoPi * u1;
  *n0 = r * cosf(theta);
  *n1 = r * sinf(theta);
}
}  // namespace scorefast
