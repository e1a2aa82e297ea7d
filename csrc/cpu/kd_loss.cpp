// CPU kernels for fastdistil::_kd_loss_{fwd,bwd}_cpu.
// Spec: kd_loss_fwd_ref / kd_loss_bwd_ref in fastdistil/ops/kd_loss.py; per-row math in
// csrc/common/fd_math.h (shared with csrc/cuda/kd_loss.cu); tests in tests/ops/test_kd_loss.py.
//
// Forward: ONE pass over each row (online log-sum-exp of s/T and t/T plus the p-weighted
// (t - s)/T sum), rows in parallel. Backward: one pass per row from the saved log-sum-exps,
// writing the gradient. Memory traffic per row: fwd reads s, t; bwd reads s, t and writes ds.
// No (N, V) temporary besides the gradient itself.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../checks.h"
#include "vec.h"

namespace fastdistil {
namespace {

// Grain for at::parallel_for over rows: enough elements per task to amortise scheduling.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

// One row, fp32 math on fp32/bf16/fp16 data.
template <typename scalar_t>
void kd_fwd_row(const scalar_t* s_row, const scalar_t* t_row, int64_t V, float inv_temperature,
                float* loss, float* s_lse, float* t_lse) {
  alignas(64) float s_buf[kBlock];
  alignas(64) float t_buf[kBlock];
  const Vec v_inv_t(inv_temperature), v_neg_inf(-INFINITY), v_zero(0.f);
  OnlineLse<float> student{-INFINITY, 0.f}, teacher{-INFINITY, 0.f};
  float weighted = 0.f;  // sum exp(t/T - teacher.m) * (t - s)/T, rescaled whenever teacher.m grows
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t n = std::min(kBlock, V - start);
    const float* s = as_float_block(s_row + start, n, s_buf);
    const float* t = as_float_block(t_row + start, n, t_buf);
    // Block maxima first (cheap, data in L1), so each element needs one exp per tensor.
    const float bm_s = block_max(s, n) * inv_temperature;  // T > 0: max(x / T) = max(x) / T
    const float m_t = fd_max(teacher.m, block_max(t, n) * inv_temperature);

    if (bm_s != -INFINITY) {
      const Vec v_m(bm_s);
      Vec acc(0.f);
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) acc += fd_exp(Vec::loadu(s + i) * v_inv_t - v_m);
      float d = vec_sum(acc);
      for (; i < n; ++i) d += fd_exp(s[i] * inv_temperature - bm_s);
      student = lse_merge(student, bm_s, d);
    }
    if (m_t != -INFINITY) {
      const float rescale = fd_exp(teacher.m - m_t);  // 0 on the first finite block
      const Vec v_m(m_t);
      Vec acc_d(0.f), acc_w(0.f);
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) {
        const Vec sv = Vec::loadu(s + i), tv = Vec::loadu(t + i);
        const Vec e = fd_exp(tv * v_inv_t - v_m);
        acc_d += e;
        acc_w += kd_weighted_term(e, sv, tv, v_inv_t, v_neg_inf, v_zero);
      }
      float d = vec_sum(acc_d), w = vec_sum(acc_w);
      for (; i < n; ++i) {
        const float e = fd_exp(t[i] * inv_temperature - m_t);
        d += e;
        w += kd_weighted_term(e, s[i], t[i], inv_temperature, -INFINITY, 0.f);
      }
      teacher = {m_t, teacher.d * rescale + d};
      weighted = weighted * rescale + w;
    }
  }
  *loss = kd_row_loss(weighted, teacher, student);
  *s_lse = lse_value(student);
  *t_lse = lse_value(teacher);
}

// One row in float64 (for gradcheck): the same formulas, scalar.
void kd_fwd_row(const double* s, const double* t, int64_t V, double inv_temperature, double* loss,
                double* s_lse, double* t_lse) {
  OnlineLse<double> student{-INFINITY, 0.0}, teacher{-INFINITY, 0.0};
  double weighted = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    const double sv = s[v] * inv_temperature, tv = t[v] * inv_temperature;
    student = lse_merge(student, sv, 1.0);
    const double m_t = fd_max(teacher.m, tv);
    if (m_t == -INFINITY) continue;
    const double rescale = fd_exp(teacher.m - m_t);
    const double e = fd_exp(tv - m_t);
    teacher = {m_t, teacher.d * rescale + e};
    weighted = weighted * rescale + kd_weighted_term(e, s[v], t[v], inv_temperature, -(double)INFINITY, 0.0);
  }
  *loss = kd_row_loss(weighted, teacher, student);
  *s_lse = lse_value(student);
  *t_lse = lse_value(teacher);
}

template <typename scalar_t>
void kd_bwd_row(const scalar_t* s_row, const scalar_t* t_row, scalar_t* g_row, int64_t V, float inv_temperature,
                float lse_s, float lse_t, float scale) {
  alignas(64) float s_buf[kBlock];
  alignas(64) float t_buf[kBlock];
  alignas(64) float g_buf[kBlock];
  const Vec v_inv_t(inv_temperature), v_lse_s(lse_s), v_lse_t(lse_t), v_scale(scale);
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t n = std::min(kBlock, V - start);
    const float* s = as_float_block(s_row + start, n, s_buf);
    const float* t = as_float_block(t_row + start, n, t_buf);
    float* g = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(g_row + start) : g_buf;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size())
      kd_grad(Vec::loadu(s + i), Vec::loadu(t + i), v_inv_t, v_lse_s, v_lse_t, v_scale).store(g + i);
    for (; i < n; ++i) g[i] = kd_grad(s[i], t[i], inv_temperature, lse_s, lse_t, scale);
    store_block(g, n, g_row + start);
  }
}

void kd_bwd_row(const double* s, const double* t, double* g, int64_t V, double inv_temperature, double lse_s,
                double lse_t, double scale) {
  for (int64_t v = 0; v < V; ++v) g[v] = kd_grad(s[v], t[v], inv_temperature, lse_s, lse_t, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& student_logits,
                                                               const at::Tensor& teacher_logits, double temperature,
                                                               const std::optional<at::Tensor>& row_mask) {
  FD_CHECK_2D(student_logits);
  FD_CHECK_SAME_SHAPE(student_logits, teacher_logits);
  FD_CHECK_SAME_DTYPE(student_logits, teacher_logits);
  FD_CHECK_FLOATING(student_logits);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be finite and > 0, got ", temperature);
  const at::Tensor s = student_logits.contiguous(), t = teacher_logits.contiguous();
  const int64_t N = s.size(0), V = s.size(1);
  const at::Tensor mask = checked_row_mask(row_mask, N);
  const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  // fp32 statistics for fp32/bf16/fp16 inputs, fp64 for fp64 (gradcheck).
  const auto acc = s.options().dtype(at::toOpMathType(s.scalar_type()));
  at::Tensor loss = at::empty({N}, acc), s_lse = at::empty({N}, acc), t_lse = at::empty({N}, acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "kd_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s_ptr = s.data_ptr<scalar_t>();
    const scalar_t* t_ptr = t.data_ptr<scalar_t>();
    acc_t* loss_ptr = loss.data_ptr<acc_t>();
    acc_t* s_lse_ptr = s_lse.data_ptr<acc_t>();
    acc_t* t_lse_ptr = t_lse.data_ptr<acc_t>();
    const acc_t inv_temperature = acc_t(1.0 / temperature);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (mask_ptr && !mask_ptr[i]) {  // unselected rows are never read
          loss_ptr[i] = s_lse_ptr[i] = t_lse_ptr[i] = acc_t(0);
          continue;
        }
        kd_fwd_row(s_ptr + i * V, t_ptr + i * V, V, inv_temperature, loss_ptr + i, s_lse_ptr + i, t_lse_ptr + i);
      }
    });
  });
  return {loss, s_lse, t_lse};
}

at::Tensor kd_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                           const at::Tensor& teacher_logits, const at::Tensor& student_lse,
                           const at::Tensor& teacher_lse, double temperature, const std::optional<at::Tensor>& row_mask) {
  FD_CHECK_2D(student_logits);
  FD_CHECK_SAME_SHAPE(student_logits, teacher_logits);
  FD_CHECK_SAME_DTYPE(student_logits, teacher_logits);
  const at::Tensor s = student_logits.contiguous(), t = teacher_logits.contiguous();
  const int64_t N = s.size(0), V = s.size(1);
  const auto acc_type = at::toOpMathType(s.scalar_type());
  const at::Tensor g = grad_loss.to(acc_type).contiguous(), ls = student_lse.to(acc_type).contiguous(),
                   lt = teacher_lse.to(acc_type).contiguous();
  TORCH_CHECK(g.numel() == N && ls.numel() == N && lt.numel() == N, "grad_loss and lse tensors must have ", N,
              " elements");
  const at::Tensor mask = checked_row_mask(row_mask, N);
  const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  at::Tensor grad = at::empty_like(s);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "kd_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s_ptr = s.data_ptr<scalar_t>();
    const scalar_t* t_ptr = t.data_ptr<scalar_t>();
    scalar_t* grad_ptr = grad.data_ptr<scalar_t>();
    const acc_t* g_ptr = g.data_ptr<acc_t>();
    const acc_t* ls_ptr = ls.data_ptr<acc_t>();
    const acc_t* lt_ptr = lt.data_ptr<acc_t>();
    const acc_t inv_temperature = acc_t(1.0 / temperature);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* out = grad_ptr + i * V;
        if (mask_ptr && !mask_ptr[i]) {  // exact zeros, even where the unselected row holds NaN
          std::fill(out, out + V, scalar_t(0));
          continue;
        }
        kd_bwd_row(s_ptr + i * V, t_ptr + i * V, out, V, inv_temperature, ls_ptr[i], lt_ptr[i],
                   g_ptr[i] * inv_temperature);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistil, CPU, m) {
  m.impl("_kd_loss_fwd_cpu", &kd_loss_fwd_cpu);
  m.impl("_kd_loss_bwd_cpu", &kd_loss_bwd_cpu);
}

}  // namespace fastdistil
