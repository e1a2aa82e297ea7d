// CPU kernel for fastdistil::_distill_epilogue_cpu, the fused epilogue of the distillation head.
// Spec: distill_epilogue_ref in fastdistil/ops/distill_head.py; per-row math in csrc/common/fd_math.h
// (shared with csrc/cuda/distill_head.cu); tests in tests/ops/test_distill_head.py.
//
// Input: one chunk of student and teacher logits (C, V), just produced by the two vocabulary GEMMs.
// Per row, rows in parallel:
//   pass 1: block maxima, then the online log-sum-exps of s/T and t/T and the p-weighted (t - s)/T sum
//           (KL rows), and the log-sum-exp of s at T = 1 (labelled rows): the row's kl and ce.
//   pass 2 (with_grad): g = kl_c (q - p) + mlm_c (softmax(s) - onehot(label)), written over the student
//           logits IN PLACE (the chunk buffer becomes d objective / d logits for the backward GEMMs).
// A row of s and t (2 x 122 KB at V = 30522) stays in L2 between the passes, so pass 2 recomputes its
// exponentials from cache instead of storing them. The whole epilogue is a few percent of the chunk's
// four GEMMs; what matters is that it reads each logit from memory once and writes it once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../checks.h"
#include "vec.h"

namespace fastdistil {
namespace {

struct RowOut {
  float kl, ce;
};

// One row: kKl = the row is in the KL row set, kMlm = it has a label. Returns (kl, ce); with_grad
// overwrites s_row with the gradient.
template <bool kKl, bool kMlm, typename scalar_t>
RowOut head_row(scalar_t* s_row, const scalar_t* t_row, int64_t V, float inv_t, int64_t label, float kl_c,
                float mlm_c, bool with_grad) {
  alignas(64) float s_buf[kBlock];
  alignas(64) float t_buf[kBlock];
  const Vec v_inv_t(inv_t), v_neg_inf(-INFINITY), v_zero(0.f);
  OnlineLse<float> student{-INFINITY, 0.f}, student_t1{-INFINITY, 0.f};
  KdTeacher<float> teacher{-INFINITY, 0.f, 0.f};
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t n = std::min(kBlock, V - start);
    const float* s = as_float_block(s_row + start, n, s_buf);
    const float bm_s = block_max(s, n);
    if constexpr (kKl) {
      const float* t = as_float_block(t_row + start, n, t_buf);
      const float rs = exp_ref(bm_s * inv_t), rt = exp_ref(block_max(t, n) * inv_t);
      const Vec v_rs(rs), v_rt(rt);
      Vec acc_s(0.f), acc_t(0.f), acc_w(0.f);
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) {
        const Vec sv = Vec::loadu(s + i), tv = Vec::loadu(t + i);
        const Vec e_t = fd_exp(tv * v_inv_t - v_rt);
        acc_s += fd_exp(sv * v_inv_t - v_rs);
        acc_t += e_t;
        acc_w += kd_weighted_term(e_t, sv, tv, v_inv_t, v_neg_inf, v_zero);
      }
      float ds = vec_sum(acc_s), dt = vec_sum(acc_t), w = vec_sum(acc_w);
      for (; i < n; ++i) {
        const float e_t = fd_exp(t[i] * inv_t - rt);
        ds += fd_exp(s[i] * inv_t - rs);
        dt += e_t;
        w += kd_weighted_term(e_t, s[i], t[i], inv_t, -INFINITY, 0.f);
      }
      student = lse_merge(student, rs, ds);
      teacher = kd_teacher_merge(teacher, rt, dt, w);
    }
    if constexpr (kMlm) {
      const float r1 = exp_ref(bm_s);
      const Vec v_r1(r1);
      Vec acc(0.f);
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) acc += fd_exp(Vec::loadu(s + i) - v_r1);
      float d1 = vec_sum(acc);
      for (; i < n; ++i) d1 += fd_exp(s[i] - r1);
      student_t1 = lse_merge(student_t1, r1, d1);
    }
  }
  RowOut out{0.f, 0.f};
  if constexpr (kKl) out.kl = kd_row_loss(teacher, student);
  if constexpr (kMlm) out.ce = ce_row_loss(student_t1, static_cast<float>(s_row[label]));
  if (!with_grad) return out;

  const float lse_s = lse_value(student), lse_t = lse_value(teacher), lse_1 = lse_value(student_t1);
  const Vec v_lse_s(lse_s), v_lse_t(lse_t), v_lse_1(lse_1), v_kl_c(kl_c), v_mlm_c(mlm_c);
  alignas(64) float g_buf[kBlock];
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t n = std::min(kBlock, V - start);
    const float* s = as_float_block(s_row + start, n, s_buf);
    const float* t = kKl ? as_float_block(t_row + start, n, t_buf) : nullptr;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec sv = Vec::loadu(s + i);
      Vec q(0.f), p(0.f), r(0.f);
      if constexpr (kKl) {
        q = fd_exp(sv * v_inv_t - v_lse_s);
        p = fd_exp(Vec::loadu(t + i) * v_inv_t - v_lse_t);
      }
      if constexpr (kMlm) r = fd_exp(sv - v_lse_1);
      head_grad(q, p, r, v_kl_c, v_mlm_c).store(g_buf + i);
    }
    for (; i < n; ++i) {
      float q = 0.f, p = 0.f, r = 0.f;
      if constexpr (kKl) {
        q = fd_exp(s[i] * inv_t - lse_s);
        p = fd_exp(t[i] * inv_t - lse_t);
      }
      if constexpr (kMlm) r = fd_exp(s[i] - lse_1);
      g_buf[i] = head_grad(q, p, r, kl_c, mlm_c);
    }
    if (kMlm && label >= start && label < start + n) g_buf[label - start] -= mlm_c;
    store_block(g_buf, n, s_row + start);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> distill_epilogue_cpu(const at::Tensor& student_logits,
                                                        const at::Tensor& teacher_logits,
                                                        const std::optional<at::Tensor>& kl_rows,
                                                        const std::optional<at::Tensor>& labels,
                                                        const at::Tensor& kl_coef, const at::Tensor& mlm_coef,
                                                        double temperature, bool with_grad) {
  check_epilogue_devices(student_logits, teacher_logits, kl_rows, labels, kl_coef, mlm_coef);
  const at::Tensor lab = checked_epilogue_args(student_logits, teacher_logits, labels, temperature);
  const at::Tensor t = teacher_logits.contiguous();
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  const auto dtype = student_logits.scalar_type();
  const at::Tensor rows = checked_row_mask(kl_rows, N);
  const float kl_c = kl_coef.item<float>(), mlm_c = mlm_coef.item<float>();  // CPU scalars: no device sync
  at::Tensor kl = at::zeros({N}, student_logits.options().dtype(at::kFloat));
  at::Tensor ce = at::zeros({N}, student_logits.options().dtype(at::kFloat));
  const bool* rows_ptr = rows.defined() ? rows.data_ptr<bool>() : nullptr;
  const int64_t* lab_ptr = lab.defined() ? lab.data_ptr<int64_t>() : nullptr;
  if (lab_ptr != nullptr) {
    for (int64_t i = 0; i < N; ++i)
      TORCH_CHECK(lab_ptr[i] == -100 || (lab_ptr[i] >= 0 && lab_ptr[i] < V), "label ", lab_ptr[i], " of row ", i,
                  " is outside [0, ", V, ") and not -100");
  }
  const float inv_t = float(1.0 / temperature);
  float* kl_ptr = kl.data_ptr<float>();
  float* ce_ptr = ce.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "distill_epilogue_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      scalar_t* s_ptr = student_logits.data_ptr<scalar_t>();
      const scalar_t* t_ptr = t.data_ptr<scalar_t>();
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const bool in_kl = rows_ptr == nullptr || rows_ptr[i];
          const int64_t label = lab_ptr == nullptr ? -100 : lab_ptr[i];
          scalar_t* s_row = s_ptr + i * V;
          const scalar_t* t_row = t_ptr + i * V;
          RowOut out{0.f, 0.f};
          if (in_kl && label >= 0) {
            out = head_row<true, true>(s_row, t_row, V, inv_t, label, kl_c, mlm_c, with_grad);
          } else if (in_kl) {
            out = head_row<true, false>(s_row, t_row, V, inv_t, label, kl_c, 0.f, with_grad);
          } else if (label >= 0) {
            out = head_row<false, true>(s_row, t_row, V, inv_t, label, 0.f, mlm_c, with_grad);
          } else if (with_grad) {
            std::fill(s_row, s_row + V, scalar_t(0));  // in neither row set: no gradient
          }
          kl_ptr[i] = out.kl;
          ce_ptr[i] = out.ce;
        }
      });
    }
  });
  return {kl, ce};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistil, CPU, m) { m.impl("_distill_epilogue_cpu", &distill_epilogue_cpu); }

}  // namespace fastdistil
