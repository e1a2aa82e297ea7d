// CPU kernels for fastdistil::_kd_loss_fwd_cpu and fastdistil::_kd_loss_bwd_cpu.
// Spec: kd_loss_fwd_ref / kd_loss_bwd_ref in fastdistil/ops/kd_loss.py; per-row math in
// csrc/common/fd_math.h (shared with csrc/cuda/kd_loss.cu); tests in tests/ops/test_kd_loss.py.
//
// Forward, per row, rows in parallel:
//   pass 1 (reads s and t from memory once): per block of kBlock logits, the block maxima, then
//     e_s = exp(s/T - max_s) and e_t = exp(t/T - max_t), merged into online log-sum-exps and the
//     p-weighted (t - s)/T sum that gives the KL. With a gradient requested, e_s and e_t are kept in a
//     per-thread row buffer (2 x V floats: 244 KB for BERT's vocabulary, L2-resident).
//   pass 2 (only with a gradient): d KL / d s = (q - p)/T = e_s * c_s - e_t * c_t with per-block
//     scalars c = exp(max - lse)/T, written once, interleaved block by block with the next row's pass 1
//     (software pipelining: the gradient stores drain while the exponentials compute).
//   Two exps per logit in all, one read of each input.
// Backward: scales each gradient row by grad_loss[i], in place (no second (N, V) buffer).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "alloc.h"
#include "vec.h"

namespace fastdistil {
namespace {

// Grain for at::parallel_for over rows: enough elements per task to amortise scheduling.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

// Row buffers for the exponentials kept between the two passes of one row: e_s, e_t (V floats each) and
// the per-block reference maxima (ceil(V / kBlock) each).
struct RowBuffers {
  float* es;
  float* et;
  float* ref_s;
  float* ref_t;
};

// A row whose exponentials are computed but whose gradient is not written yet. Its blocks are written
// while the NEXT row's first pass computes, so the (store-bound) gradient write overlaps the
// (exp-bound) first pass instead of following it.
template <typename scalar_t>
struct PendingGrad {
  scalar_t* g_row = nullptr;  // null: nothing pending
  RowBuffers buf{};
  float lse_s = 0.f, lse_t = 0.f;
  int64_t next = 0;  // first element not written yet
};

// Write the next block of the pending row's gradient (q - p)/T = e_s * c_s - e_t * c_t.
template <typename scalar_t>
void write_grad_block(PendingGrad<scalar_t>& p, int64_t V, float inv_temperature) {
  const int64_t start = p.next, b = start / kBlock, n = std::min(kBlock, V - start);
  const float c_s = kd_coef(p.buf.ref_s[b], p.lse_s, inv_temperature);
  const float c_t = kd_coef(p.buf.ref_t[b], p.lse_t, inv_temperature);
  const Vec v_cs(c_s), v_ct(c_t);
  const float* e_s = p.buf.es + start;
  const float* e_t = p.buf.et + start;
  if constexpr (std::is_same_v<scalar_t, float>) {
    // fp32 output: straight to the gradient row with streaming stores (aligned head/tail done scalar).
    float* g = p.g_row + start;
    const int64_t head = to_alignment(g, n);
    int64_t i = 0;
    for (; i < head; ++i) g[i] = kd_grad_from_exp(e_s[i], e_t[i], c_s, c_t);
    for (; i + Vec::size() <= n; i += Vec::size())
      stream_store(g + i, kd_grad_from_exp(Vec::loadu(e_s + i), Vec::loadu(e_t + i), v_cs, v_ct));
    for (; i < n; ++i) g[i] = kd_grad_from_exp(e_s[i], e_t[i], c_s, c_t);
  } else {
    alignas(64) float g_buf[kBlock];
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size())
      kd_grad_from_exp(Vec::loadu(e_s + i), Vec::loadu(e_t + i), v_cs, v_ct).store(g_buf + i);
    for (; i < n; ++i) g_buf[i] = kd_grad_from_exp(e_s[i], e_t[i], c_s, c_t);
    store_block(g_buf, n, p.g_row + start);
  }
  p.next = start + n;
  if (p.next >= V) p.g_row = nullptr;
}

template <typename scalar_t>
void flush(PendingGrad<scalar_t>& p, int64_t V, float inv_temperature) {
  while (p.g_row != nullptr) write_grad_block(p, V, inv_temperature);
}

// First pass over one row, fp32 math on fp32/bf16/fp16 data: returns the row's loss and its log-sum-exps.
// kWithGrad: also keeps the exponentials in `buf` and writes one block of `pending` per block read.
template <bool kWithGrad, typename scalar_t>
float kd_row(const scalar_t* s_row, const scalar_t* t_row, int64_t V, float inv_temperature, RowBuffers buf,
             PendingGrad<scalar_t>* pending, float* lse_s, float* lse_t) {
  alignas(64) float s_buf[kBlock];
  alignas(64) float t_buf[kBlock];
  const Vec v_inv_t(inv_temperature), v_neg_inf(-INFINITY), v_zero(0.f);
  OnlineLse<float> student{-INFINITY, 0.f};
  KdTeacher<float> teacher{-INFINITY, 0.f, 0.f};
  for (int64_t start = 0, b = 0; start < V; start += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - start);
    const float* s = as_float_block(s_row + start, n, s_buf);
    const float* t = as_float_block(t_row + start, n, t_buf);
    // Block maxima first (cheap, the block is in L1), so each logit needs exactly one exp.
    const float bm_s = block_max(s, n) * inv_temperature;  // T > 0: max(x / T) = max(x) / T
    const float bm_t = block_max(t, n) * inv_temperature;
    const float rs = exp_ref(bm_s), rt = exp_ref(bm_t);
    const Vec v_rs(rs), v_rt(rt);
    Vec acc_s(0.f), acc_t(0.f), acc_w(0.f);
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec sv = Vec::loadu(s + i), tv = Vec::loadu(t + i);
      const Vec e_s = fd_exp(sv * v_inv_t - v_rs), e_t = fd_exp(tv * v_inv_t - v_rt);
      acc_s += e_s;
      acc_t += e_t;
      acc_w += kd_weighted_term(e_t, sv, tv, v_inv_t, v_neg_inf, v_zero);
      if constexpr (kWithGrad) {
        e_s.store(buf.es + start + i);
        e_t.store(buf.et + start + i);
      }
    }
    float ds = vec_sum(acc_s), dt = vec_sum(acc_t), w = vec_sum(acc_w);
    for (; i < n; ++i) {
      const float e_s = fd_exp(s[i] * inv_temperature - rs), e_t = fd_exp(t[i] * inv_temperature - rt);
      ds += e_s;
      dt += e_t;
      w += kd_weighted_term(e_t, s[i], t[i], inv_temperature, -INFINITY, 0.f);
      if constexpr (kWithGrad) {
        buf.es[start + i] = e_s;
        buf.et[start + i] = e_t;
      }
    }
    student = lse_merge(student, rs, ds);
    teacher = kd_teacher_merge(teacher, rt, dt, w);
    if constexpr (kWithGrad) {
      buf.ref_s[b] = rs;
      buf.ref_t[b] = rt;
      if (pending->g_row != nullptr) write_grad_block(*pending, V, inv_temperature);
    }
  }
  *lse_s = lse_value(student);
  *lse_t = lse_value(teacher);
  return kd_row_loss(teacher, student);
}

// One row in float64 (gradcheck runs the C++ kernel through this): the same formulas, scalar.
// (A template only so that every AT_DISPATCH branch compiles; it is called for double.)
template <typename scalar_t>
double kd_row_f64(const scalar_t* s, const scalar_t* t, scalar_t* g, int64_t V, double inv_temperature) {
  OnlineLse<double> student{-INFINITY, 0.0};
  KdTeacher<double> teacher{-INFINITY, 0.0, 0.0};
  for (int64_t v = 0; v < V; ++v) {
    const double sv = double(s[v]), tv = double(t[v]);
    const double rs = exp_ref(sv * inv_temperature), rt = exp_ref(tv * inv_temperature);
    const double e_s = fd_exp(sv * inv_temperature - rs), e_t = fd_exp(tv * inv_temperature - rt);
    student = lse_merge(student, rs, e_s);
    teacher = kd_teacher_merge(teacher, rt, e_t, kd_weighted_term(e_t, sv, tv, inv_temperature, -(double)INFINITY, 0.0));
  }
  if (g != nullptr) {
    const double lse_s = lse_value(student), lse_t = lse_value(teacher);
    for (int64_t v = 0; v < V; ++v)
      g[v] = scalar_t(kd_grad(double(s[v]), double(t[v]), inv_temperature, lse_s, lse_t, inv_temperature));
  }
  return kd_row_loss(teacher, student);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                                   double temperature, const std::optional<at::Tensor>& row_mask,
                                                   bool with_grad) {
  check_student_teacher(student_logits, teacher_logits);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be finite and > 0, got ", temperature);
  const at::Tensor s = student_logits.contiguous(), t = teacher_logits.contiguous();
  const int64_t N = s.size(0), V = s.size(1);
  const at::Tensor mask = checked_row_mask(row_mask, N);
  const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  // fp32 loss for fp32/bf16/fp16 inputs, fp64 for fp64 (gradcheck).
  at::Tensor loss = at::empty({N}, s.options().dtype(at::toOpMathType(s.scalar_type())));
  at::Tensor grad = with_grad ? empty_for_output(s) : at::empty({0}, s.options());
  const int64_t n_blocks = (V + kBlock - 1) / kBlock;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "kd_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s_ptr = s.data_ptr<scalar_t>();
    const scalar_t* t_ptr = t.data_ptr<scalar_t>();
    scalar_t* grad_ptr = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
    acc_t* loss_ptr = loss.data_ptr<acc_t>();
    const acc_t inv_temperature = acc_t(1.0 / temperature);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      // Two sets of row buffers: the current row's first pass fills one while the previous row's
      // gradient is written from the other.
      std::vector<float> storage(with_grad ? 2 * 2 * (V + n_blocks) : 0);
      RowBuffers sets[2];
      for (int k = 0; k < 2 && with_grad; ++k) {
        float* base = storage.data() + k * 2 * (V + n_blocks);
        sets[k] = {base, base + V, base + 2 * V, base + 2 * V + n_blocks};
      }
      PendingGrad<scalar_t> pending;
      int cur = 0;
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* g_row = with_grad ? grad_ptr + i * V : nullptr;
        if (mask_ptr && !mask_ptr[i]) {  // unselected rows are never read; exact zero gradient
          loss_ptr[i] = acc_t(0);
          if (with_grad) std::fill(g_row, g_row + V, scalar_t(0));
          continue;
        }
        const scalar_t* s_row = s_ptr + i * V;
        const scalar_t* t_row = t_ptr + i * V;
        if constexpr (std::is_same_v<scalar_t, double>) {
          loss_ptr[i] = kd_row_f64(s_row, t_row, g_row, V, inv_temperature);
        } else {
          float lse_s, lse_t;
          if (with_grad) {
            loss_ptr[i] = kd_row<true>(s_row, t_row, V, inv_temperature, sets[cur], &pending, &lse_s, &lse_t);
            flush(pending, V, inv_temperature);  // normally done already: rows have equal block counts
            pending = {g_row, sets[cur], lse_s, lse_t, 0};
            cur ^= 1;
          } else {
            loss_ptr[i] = kd_row<false>(s_row, t_row, V, inv_temperature, sets[cur], &pending, &lse_s, &lse_t);
          }
        }
      }
      if constexpr (!std::is_same_v<scalar_t, double>) flush(pending, V, inv_temperature);
      stream_fence();  // make the streamed gradient visible before the task ends
    });
  });
  return {loss, grad};
}

// grad_logits[i, :] *= grad_loss[i], in place.
void kd_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_logits) {
  FD_CHECK_2D(grad_logits);
  TORCH_CHECK(grad_logits.is_contiguous(), "grad_logits must be contiguous");
  const int64_t N = grad_logits.size(0), V = grad_logits.size(1);
  const at::Tensor g = grad_loss.to(at::toOpMathType(grad_logits.scalar_type())).contiguous();
  TORCH_CHECK(g.numel() == N, "grad_loss must have ", N, " elements, got ", g.numel());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_logits.scalar_type(), "kd_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* grad_ptr = grad_logits.data_ptr<scalar_t>();
    const acc_t* g_ptr = g.data_ptr<acc_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      alignas(64) float buf[kBlock];
      for (int64_t i = begin; i < end; ++i) {
        const acc_t scale = g_ptr[i];
        if (scale == acc_t(1)) continue;  // e.g. reduction="sum" with unit weight: nothing to do
        scalar_t* row = grad_ptr + i * V;
        if constexpr (std::is_same_v<scalar_t, double>) {
          for (int64_t v = 0; v < V; ++v) row[v] *= scale;
        } else {
          const Vec v_scale(scale);
          for (int64_t start = 0; start < V; start += kBlock) {
            const int64_t n = std::min(kBlock, V - start);
            float* x = const_cast<float*>(as_float_block(row + start, n, buf));
            int64_t j = 0;
            for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) * v_scale).store(x + j);
            for (; j < n; ++j) x[j] *= scale;
            store_block(x, n, row + start);
          }
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistil, CPU, m) {
  m.impl("_kd_loss_fwd_cpu", &kd_loss_fwd_cpu);
  m.impl("_kd_loss_bwd_cpu", &kd_loss_bwd_cpu);
}

}  // namespace fastdistil
