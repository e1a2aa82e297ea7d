// SIMD setup for the CPU kernels, then the shared per-row math (csrc/common/fd_math.h).
//
// ATen's Vectorized<float> picks its width from CPU_CAPABILITY_* macros. setup.py compiles with
// -march=native (or FASTDISTIL_CPU_ARCH), so we map the compiler's own ISA macros onto them here:
// the kernels use whatever the build machine has (AVX-512, AVX2+FMA, or plain scalar code).
// The inline namespace gets a fastdistil-specific name so our instantiations can never be
// confused with libtorch's own (ODR) at link or load time.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY fastdistil_avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY fastdistil_avx2
#else
#define CPU_CAPABILITY fastdistil_default
#endif

#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cstdint>

namespace fastdistil {

using Vec = at::vec::Vectorized<float>;

// Overloads that let the templates of fd_math.h run on a whole SIMD register.
// exp_u20: ATen's polynomial exp (max error ~20 ulp in fp32, ~1e-6 relative). The tests hold it
// to the three-way rule against a float64 oracle; Sleef's 1-ulp exp costs twice as much here.
inline Vec fd_exp(Vec x) { return x.exp_u20(); }
inline Vec fd_select(Vec mask, Vec a, Vec b) { return Vec::blendv(b, a, mask); }

// Rows are processed in blocks that stay in L1 between the sub-passes of a kernel.
constexpr int64_t kBlock = 1024;

// Copy n elements of a row into a float buffer. float rows are used in place (no copy); bf16 and
// fp16 rows are widened block by block with SIMD conversions, so all the math runs in fp32.
template <typename scalar_t>
inline const float* as_float_block(const scalar_t* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    at::vec::convert(src, buf, n);
    return buf;
  } else {
    constexpr int64_t W = at::vec::Vectorized<scalar_t>::size();  // = 2 float vectors
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      Vec lo, hi;
      at::vec::load_to_float(src + i, lo, hi);
      lo.store(buf + i);
      hi.store(buf + i + Vec::size());
    }
    for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// Store n floats to a row of scalar_t (narrowing for bf16/fp16: round to nearest even).
template <typename scalar_t>
inline void store_block(const float* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    at::vec::convert(src, dst, n);
  } else {
    constexpr int64_t W = at::vec::Vectorized<scalar_t>::size();
    int64_t i = 0;
    for (; i + W <= n; i += W)
      at::vec::convert_from_float<scalar_t>(Vec::loadu(src + i), Vec::loadu(src + i + Vec::size())).store(dst + i);
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// NaN-propagating max of n floats, so a NaN logit reaches the loss.
inline float block_max(const float* x, int64_t n) {
  Vec acc(-INFINITY);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + i));
  float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
  for (; i < n; ++i) m = (x[i] != x[i] || x[i] > m) ? x[i] : m;
  return m;
}

// Non-temporal (streaming) store of one full vector to an address aligned to the vector width. Used for
// the (N, V) gradient, which is written once and not read again soon: it skips the read-for-ownership of
// every destination line and leaves the caches to the row buffers. Callers end with stream_fence().
constexpr int64_t kVecBytes = Vec::size() * sizeof(float);

inline void stream_store(float* dst, Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(dst, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(dst, v);
#else
  v.store(dst);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Elements from p to the next vector-aligned address (0 if p is aligned), at most n.
inline int64_t to_alignment(const float* p, int64_t n) {
  const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(p) % kVecBytes) / int64_t(sizeof(float));
  return std::min(n, mis == 0 ? int64_t(0) : int64_t(Vec::size()) - mis);
}

inline float vec_sum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

}  // namespace fastdistil

#include "../common/fd_math.h"
