// CPU kernels for fastdistil::_cosine_loss_{fwd,bwd}_cpu.
// Spec: cosine_loss_fwd_ref / cosine_loss_bwd_ref in fastdistil/ops/cosine_loss.py; per-row math in
// csrc/common/fd_math.h (shared with csrc/cuda/cosine_loss.cu); tests in tests/ops/test_cosine_loss.py.
//
// Forward: one pass per row accumulating <s,t>, |s|^2, |t|^2 (saved as `stats`, (N, 3)).
// Backward: one pass per row writing both gradients from those statistics.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "alloc.h"
#include "vec.h"

namespace fastdistil {
namespace {

inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

// stats = (<s,t>, |s|^2, |t|^2) of one row.
template <typename scalar_t>
void cos_fwd_row(const scalar_t* s_row, const scalar_t* t_row, int64_t H, float* stats) {
  alignas(64) float s_buf[kBlock];
  alignas(64) float t_buf[kBlock];
  Vec dot(0.f), ss(0.f), tt(0.f);
  float dot_tail = 0.f, ss_tail = 0.f, tt_tail = 0.f;
  for (int64_t start = 0; start < H; start += kBlock) {
    const int64_t n = std::min(kBlock, H - start);
    const float* s = as_float_block(s_row + start, n, s_buf);
    const float* t = as_float_block(t_row + start, n, t_buf);
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec sv = Vec::loadu(s + i), tv = Vec::loadu(t + i);
      dot = at::vec::fmadd(sv, tv, dot);
      ss = at::vec::fmadd(sv, sv, ss);
      tt = at::vec::fmadd(tv, tv, tt);
    }
    for (; i < n; ++i) {
      dot_tail += s[i] * t[i];
      ss_tail += s[i] * s[i];
      tt_tail += t[i] * t[i];
    }
  }
  stats[0] = vec_sum(dot) + dot_tail;
  stats[1] = vec_sum(ss) + ss_tail;
  stats[2] = vec_sum(tt) + tt_tail;
}

void cos_fwd_row(const double* s, const double* t, int64_t H, double* stats) {
  double dot = 0, ss = 0, tt = 0;
  for (int64_t i = 0; i < H; ++i) {
    dot += s[i] * t[i];
    ss += s[i] * s[i];
    tt += t[i] * t[i];
  }
  stats[0] = dot;
  stats[1] = ss;
  stats[2] = tt;
}

// out = self * coef_self + other * coef_other over one row (the gradient of one side).
template <typename scalar_t>
void cos_bwd_row(const scalar_t* self_row, const scalar_t* other_row, scalar_t* out_row, int64_t H, float coef_self,
                 float coef_other) {
  alignas(64) float a_buf[kBlock];
  alignas(64) float b_buf[kBlock];
  alignas(64) float g_buf[kBlock];
  const Vec v_self(coef_self), v_other(coef_other);
  for (int64_t start = 0; start < H; start += kBlock) {
    const int64_t n = std::min(kBlock, H - start);
    const float* a = as_float_block(self_row + start, n, a_buf);
    const float* b = as_float_block(other_row + start, n, b_buf);
    float* g = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out_row + start) : g_buf;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size())
      cosine_grad(Vec::loadu(a + i), Vec::loadu(b + i), v_self, v_other).store(g + i);
    for (; i < n; ++i) g[i] = cosine_grad(a[i], b[i], coef_self, coef_other);
    store_block(g, n, out_row + start);
  }
}

void cos_bwd_row(const double* a, const double* b, double* out, int64_t H, double coef_self, double coef_other) {
  for (int64_t i = 0; i < H; ++i) out[i] = cosine_grad(a[i], b[i], coef_self, coef_other);
}

std::tuple<at::Tensor, at::Tensor> cosine_loss_fwd_cpu(const at::Tensor& student_hidden,
                                                       const at::Tensor& teacher_hidden,
                                                       const std::optional<at::Tensor>& row_mask) {
  check_student_teacher(student_hidden, teacher_hidden);
  const at::Tensor s = student_hidden.contiguous(), t = teacher_hidden.contiguous();
  const int64_t N = s.size(0), H = s.size(1);
  const at::Tensor mask = checked_row_mask(row_mask, N);
  const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const auto acc = s.options().dtype(at::toOpMathType(s.scalar_type()));
  at::Tensor loss = at::empty({N}, acc), stats = at::empty({N, 3}, acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "cosine_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s_ptr = s.data_ptr<scalar_t>();
    const scalar_t* t_ptr = t.data_ptr<scalar_t>();
    acc_t* loss_ptr = loss.data_ptr<acc_t>();
    acc_t* stats_ptr = stats.data_ptr<acc_t>();
    at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t* st = stats_ptr + 3 * i;
        if (mask_ptr && !mask_ptr[i]) {
          loss_ptr[i] = st[0] = st[1] = st[2] = acc_t(0);
          continue;
        }
        cos_fwd_row(s_ptr + i * H, t_ptr + i * H, H, st);
        loss_ptr[i] = cosine_row_loss(st[0], st[1], st[2]);
      }
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> cosine_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student_hidden,
                                                       const at::Tensor& teacher_hidden, const at::Tensor& stats,
                                                       const std::optional<at::Tensor>& row_mask, bool student_grad,
                                                       bool teacher_grad) {
  check_student_teacher(student_hidden, teacher_hidden);
  const at::Tensor s = student_hidden.contiguous(), t = teacher_hidden.contiguous();
  const int64_t N = s.size(0), H = s.size(1);
  const auto acc_type = at::toOpMathType(s.scalar_type());
  const at::Tensor g = grad_loss.to(acc_type).contiguous(), st = stats.to(acc_type).contiguous();
  TORCH_CHECK(g.numel() == N && st.numel() == 3 * N, "grad_loss must have ", N, " and stats ", 3 * N, " elements");
  const at::Tensor mask = checked_row_mask(row_mask, N);
  const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  // Only the sides that need a gradient get a buffer (the teacher's usually does not).
  at::Tensor grad_s = student_grad ? empty_for_output(s) : at::empty({0}, s.options());
  at::Tensor grad_t = teacher_grad ? empty_for_output(t) : at::empty({0}, t.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "cosine_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s_ptr = s.data_ptr<scalar_t>();
    const scalar_t* t_ptr = t.data_ptr<scalar_t>();
    scalar_t* gs_ptr = student_grad ? grad_s.data_ptr<scalar_t>() : nullptr;
    scalar_t* gt_ptr = teacher_grad ? grad_t.data_ptr<scalar_t>() : nullptr;
    const acc_t* g_ptr = g.data_ptr<acc_t>();
    const acc_t* st_ptr = st.data_ptr<acc_t>();
    at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (mask_ptr && !mask_ptr[i]) {
          if (gs_ptr) std::fill(gs_ptr + i * H, gs_ptr + (i + 1) * H, scalar_t(0));
          if (gt_ptr) std::fill(gt_ptr + i * H, gt_ptr + (i + 1) * H, scalar_t(0));
          continue;
        }
        const acc_t* row = st_ptr + 3 * i;
        const CosineCoefs<acc_t> c = cosine_grad_coefs(row[0], row[1], row[2], g_ptr[i]);
        if (gs_ptr) cos_bwd_row(s_ptr + i * H, t_ptr + i * H, gs_ptr + i * H, H, c.self_a, c.other);
        if (gt_ptr) cos_bwd_row(t_ptr + i * H, s_ptr + i * H, gt_ptr + i * H, H, c.self_b, c.other);
      }
    });
  });
  return {grad_s, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistil, CPU, m) {
  m.impl("_cosine_loss_fwd_cpu", &cosine_loss_fwd_cpu);
  m.impl("_cosine_loss_bwd_cpu", &cosine_loss_bwd_cpu);
}

}  // namespace fastdistil
