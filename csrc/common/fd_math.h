// Per-row math shared by the CPU (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) kernels.
//
// Everything here is a template over the value type F, so the CPU build instantiates it with
// at::vec::Vectorized<float> (and float for row tails) and the CUDA build with float. The CPU
// tests therefore exercise the very formulas the GPU runs. Callers provide fd_exp / fd_log /
// fd_select overloads for their F before including this header (see csrc/cpu/vec.h and the top
// of each .cu file); the float ones are defined below.
//
// Spec: fastdistil/ops/kd_loss.py and fastdistil/ops/cosine_loss.py (the *_ref functions).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdistil {

FD_HD float fd_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // the SFU exp: 2 ulp, far below the fp32 noise of a 30k-term sum
#else
  return std::exp(x);
#endif
}
FD_HD float fd_log(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  return std::log(x);
#endif
}
// float64 versions: the CPU kernels also run in float64, so gradcheck can test them.
FD_HD double fd_exp(double x) { return std::exp(x); }
FD_HD double fd_log(double x) { return std::log(x); }
template <typename T>
FD_HD T fd_select(bool cond, T a, T b) { return cond ? a : b; }
template <typename T>
FD_HD T fd_max(T a, T b) {
  // NaN-propagating max: a NaN logit must reach the loss, never be skipped by the running max.
  return (a != a || a > b) ? a : b;
}

// ---------------------------------------------------------------------------------------------
// kd_loss. With p = softmax(t / T) and q = softmax(s / T), one row's loss is
//   KL(p || q) = sum_v p_v (t_v - s_v) / T  -  lse_t  +  lse_s,     lse_x = logsumexp(x / T),
// because log p_v - log q_v = (t_v - s_v) / T - lse_t + lse_s and sum_v p_v = 1. So the loss needs ONE
// pass over the row: online (max, sum of exp) for s and t, and the p-weighted sum of (t - s) / T,
// rescaled along with the teacher's sum. 0 * log 0 = 0: entries with t = -inf have p = 0 and add
// nothing (the select avoids 0 * -inf = NaN). The gradient wrt s is (q - p) / T.

// The p-weighted term of one element, before normalisation by the teacher's sum:
//   e_t * (t - s) * inv_T with e_t = exp(t * inv_T - m_t), and 0 where the teacher logit is -inf.
template <typename F>
FD_HD F kd_weighted_term(F e_t, F s, F t, F inv_temperature, F neg_inf, F zero) {
  return fd_select(t == neg_inf, zero, e_t * ((t - s) * inv_temperature));
}

// (q - p) * scale from unnormalised exponentials: e_s = exp(s/T - ref_s), e_t = exp(t/T - ref_t), and
// c_s = exp(ref_s - lse_s) * scale, c_t = exp(ref_t - lse_t) * scale (per block, see kd_coef).
template <typename F>
FD_HD F kd_grad_from_exp(F e_s, F e_t, F c_s, F c_t) {
  return e_s * c_s - e_t * c_t;
}

// (q - p) * scale straight from the logits and the row's log-sum-exps.
template <typename F>
FD_HD F kd_grad(F s, F t, F inv_temperature, F lse_s, F lse_t, F scale) {
  return scale * (fd_exp(s * inv_temperature - lse_s) - fd_exp(t * inv_temperature - lse_t));
}

// Exponentials of a block are taken relative to its max; a block that is all -inf uses 0 instead, so
// exp(-inf - 0) = 0 rather than exp(-inf - -inf) = NaN.
template <typename T>
FD_HD T exp_ref(T block_max) { return block_max == -INFINITY ? T(0) : block_max; }

template <typename T>
FD_HD T kd_coef(T ref, T lse, T scale) { return fd_exp(ref - lse) * scale; }

// Running state of an online log-sum-exp: max m and sum d = sum exp(x - m).
template <typename T>
struct OnlineLse {
  T m;
  T d;
};

// Merge a block whose max is block_m and whose sum relative to block_m is block_d.
template <typename T>
FD_HD OnlineLse<T> lse_merge(OnlineLse<T> a, T block_m, T block_d) {
  const T m = fd_max(a.m, block_m);
  if (m == -INFINITY) return {m, T(0)};  // everything so far is -inf: nothing to add
  return {m, a.d * fd_exp(a.m - m) + block_d * fd_exp(block_m - m)};
}

template <typename T>
FD_HD T lse_value(OnlineLse<T> a) { return a.m + fd_log(a.d); }

// The teacher's running state: online (m, d) plus the p-weighted sum w, relative to the same m.
template <typename T>
struct KdTeacher {
  T m;
  T d;
  T w;
};

template <typename T>
FD_HD KdTeacher<T> kd_teacher_merge(KdTeacher<T> a, T block_m, T block_d, T block_w) {
  const T m = fd_max(a.m, block_m);
  if (m == -INFINITY) return {m, T(0), T(0)};
  const T ca = fd_exp(a.m - m), cb = fd_exp(block_m - m);
  return {m, a.d * ca + block_d * cb, a.w * ca + block_w * cb};
}

template <typename T>
FD_HD T lse_value(KdTeacher<T> a) { return a.m + fd_log(a.d); }

// The row's KL from the one-pass statistics. KL >= 0 in exact math; the one-pass form can come out a
// few ulp below 0 when p ~= q, so clamp (NaN compares false and passes through).
template <typename T>
FD_HD T kd_row_loss(KdTeacher<T> teacher, OnlineLse<T> student) {
  const T kl = teacher.w / teacher.d - lse_value(teacher) + lse_value(student);
  return kl < T(0) ? T(0) : kl;
}

// ---------------------------------------------------------------------------------------------
// cosine_loss. loss = 1 - cos, cos = <a,b> / sqrt((|a|^2 + eps)(|b|^2 + eps)), eps = 1e-12 as in
// torch's cosine_embedding_loss. d cos / d a = b * r - a * cos / (|a|^2 + eps), r = 1 / sqrt(...).
template <typename T>
FD_HD T cosine_eps() { return T(1e-12); }

template <typename T>
FD_HD T cosine_rinv(T aa, T bb) {
  return T(1) / std::sqrt((aa + cosine_eps<T>()) * (bb + cosine_eps<T>()));
}

// One row's loss from its statistics (<a,b>, |a|^2, |b|^2).
template <typename T>
FD_HD T cosine_row_loss(T dot, T aa, T bb) { return T(1) - dot * cosine_rinv(aa, bb); }

// Per-row coefficients of the gradient of g * (1 - cos): see cosine_grad below.
template <typename T>
struct CosineCoefs {
  T self_a;  // multiplies a in d/da
  T self_b;  // multiplies b in d/db
  T other;   // multiplies the other side in either gradient
};

template <typename T>
FD_HD CosineCoefs<T> cosine_grad_coefs(T dot, T aa, T bb, T g) {
  const T rinv = cosine_rinv(aa, bb), cos = dot * rinv;
  return {g * cos / (aa + cosine_eps<T>()), g * cos / (bb + cosine_eps<T>()), -g * rinv};
}

// grad wrt a of g * (1 - cos(a, b)): -g * (b * r - a * cos / (|a|^2 + eps)).
// coef_other = -g * r, coef_self = g * cos / (|a|^2 + eps); both are per-row scalars.
template <typename F>
FD_HD F cosine_grad(F self, F other, F coef_self, F coef_other) {
  return self * coef_self + other * coef_other;
}

// ---------------------------------------------------------------------------------------------
// distill_head epilogue (fastdistil/ops/distill_head.py). One row of a chunk of student logits s and
// teacher logits t (the output of the two vocabulary projections) yields
//   kl = KL(softmax(t/T) || softmax(s/T))    (kd_row_loss above; rows of the KL row set only)
//   ce = logsumexp(s) - s[label]             (cross-entropy at T = 1; labelled rows only)
// and the gradient wrt s of the weighted objective alpha_ce * loss_ce + alpha_mlm * loss_mlm, with the
// caller's per-row coefficients (kl_c = alpha_ce * T / |R_kl| or 0, mlm_c = alpha_mlm / |R_mlm| or 0;
// d (T^2 KL) / d s = T (q - p)):
//   g_v = kl_c * (q_v - p_v) + mlm_c * (r_v - [v == label]),   q = softmax(s/T), p = softmax(t/T), r = softmax(s)
// The one-hot term is applied once per row by the caller (it touches a single element).
template <typename F>
FD_HD F head_grad(F q, F p, F r, F kl_c, F mlm_c) {
  return kl_c * (q - p) + mlm_c * r;
}

template <typename T>
FD_HD T ce_row_loss(OnlineLse<T> student_t1, T s_label) {
  return lse_value(student_t1) - s_label;
}

}  // namespace fastdistil
