// CUDA kernel for fastdistil::_distill_epilogue_cuda, the fused epilogue of the distillation head.
// Spec: distill_epilogue_ref in fastdistil/ops/distill_head.py; per-row math in csrc/common/fd_math.h
// (the CPU kernel in csrc/cpu/distill_head.cpp runs the same functions, so CPU tests exercise it).
//
// One block per row of the chunk. Pass 1: each thread keeps online states over a strided slice of the
// row (s/T and t/T with the p-weighted sum for the KL; s at T = 1 for the cross-entropy), merged across
// the block. Pass 2 (with_grad): the gradient kl_c (q - p) + mlm_c (softmax(s) - onehot) overwrites the
// student logits in place (the row is re-read mostly from L2). The coefficients are device scalars, so
// nothing here needs the host to know how many rows are selected.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../common/fd_math.h"
#include "reduce.cuh"

namespace fastdistil {
namespace {

constexpr int kThreads = 512;

struct HeadState {
  float ms, ds;      // student at T: online (max, sum)
  float mt, dt, w;   // teacher at T, and the p-weighted (t - s)/T sum
  float m1, d1;      // student at T = 1
};

__device__ __forceinline__ HeadState head_merge(HeadState a, HeadState b) {
  const OnlineLse<float> s = lse_merge(OnlineLse<float>{a.ms, a.ds}, b.ms, b.ds);
  const KdTeacher<float> t = kd_teacher_merge(KdTeacher<float>{a.mt, a.dt, a.w}, b.mt, b.dt, b.w);
  const OnlineLse<float> s1 = lse_merge(OnlineLse<float>{a.m1, a.d1}, b.m1, b.d1);
  return {s.m, s.d, t.m, t.d, t.w, s1.m, s1.d};
}

template <typename scalar_t>
__global__ void distill_epilogue_kernel(scalar_t* __restrict__ s_ptr, const scalar_t* __restrict__ t_ptr,
                                        const bool* __restrict__ rows_ptr, const int64_t* __restrict__ labels_ptr,
                                        const float* __restrict__ kl_coef, const float* __restrict__ mlm_coef,
                                        float* __restrict__ kl_out, float* __restrict__ ce_out, int64_t V,
                                        float inv_t, bool with_grad) {
  const int64_t row = blockIdx.x;
  const bool in_kl = rows_ptr == nullptr || rows_ptr[row];
  const int64_t label = labels_ptr == nullptr ? -100 : labels_ptr[row];
  const bool has_label = label >= 0;
  scalar_t* s_row = s_ptr + row * V;
  const scalar_t* t_row = t_ptr + row * V;
  const HeadState identity{-INFINITY, 0.f, -INFINITY, 0.f, 0.f, -INFINITY, 0.f};
  HeadState st = identity;
  if (in_kl || has_label) {
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const float s_raw = static_cast<float>(s_row[v]);
      if (in_kl) {
        const float t_raw = static_cast<float>(t_row[v]);
        const float s = s_raw * inv_t, t = t_raw * inv_t;
        const OnlineLse<float> sn = lse_merge(OnlineLse<float>{st.ms, st.ds}, s, 1.f);
        const float e_t = t == -INFINITY ? 0.f : 1.f;  // an element is a block of one (sum 1, or 0 when -inf)
        const KdTeacher<float> tn = kd_teacher_merge(KdTeacher<float>{st.mt, st.dt, st.w}, t, e_t,
                                                     kd_weighted_term(e_t, s_raw, t_raw, inv_t, -INFINITY, 0.f));
        st.ms = sn.m, st.ds = sn.d, st.mt = tn.m, st.dt = tn.d, st.w = tn.w;
      }
      if (has_label) {
        const OnlineLse<float> s1 = lse_merge(OnlineLse<float>{st.m1, st.d1}, s_raw, 1.f);
        st.m1 = s1.m, st.d1 = s1.d;
      }
    }
  }
  st = block_reduce(st, head_merge, identity);
  const float s_label = has_label ? static_cast<float>(s_row[label]) : 0.f;
  if (threadIdx.x == 0) {
    kl_out[row] = in_kl ? kd_row_loss(KdTeacher<float>{st.mt, st.dt, st.w}, OnlineLse<float>{st.ms, st.ds}) : 0.f;
    ce_out[row] = has_label ? ce_row_loss(OnlineLse<float>{st.m1, st.d1}, s_label) : 0.f;
  }
  if (!with_grad) return;
  __syncthreads();  // s_label is read by every thread before any thread overwrites the row
  const float kl_c = in_kl ? *kl_coef : 0.f, mlm_c = has_label ? *mlm_coef : 0.f;
  const float lse_s = lse_value(OnlineLse<float>{st.ms, st.ds});
  const float lse_t = lse_value(KdTeacher<float>{st.mt, st.dt, st.w});
  const float lse_1 = lse_value(OnlineLse<float>{st.m1, st.d1});
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float s = static_cast<float>(s_row[v]);
    const float q = in_kl ? fd_exp(s * inv_t - lse_s) : 0.f;
    const float p = in_kl ? fd_exp(static_cast<float>(t_row[v]) * inv_t - lse_t) : 0.f;
    const float r = has_label ? fd_exp(s - lse_1) : 0.f;
    float g = head_grad(q, p, r, kl_c, mlm_c);
    if (v == label) g -= mlm_c;
    s_row[v] = static_cast<scalar_t>(g);
  }
}

std::tuple<at::Tensor, at::Tensor> distill_epilogue_cuda(const at::Tensor& student_logits,
                                                         const at::Tensor& teacher_logits,
                                                         const std::optional<at::Tensor>& kl_rows,
                                                         const std::optional<at::Tensor>& labels,
                                                         const at::Tensor& kl_coef, const at::Tensor& mlm_coef,
                                                         double temperature, bool with_grad) {
  check_epilogue_devices(student_logits, teacher_logits, kl_rows, labels, kl_coef, mlm_coef);
  const at::Tensor lab = checked_epilogue_args(student_logits, teacher_logits, labels, temperature);
  const c10::cuda::CUDAGuard device_guard(student_logits.device());
  const at::Tensor t = teacher_logits.contiguous();
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  const auto dtype = student_logits.scalar_type();
  const at::Tensor rows = checked_row_mask(kl_rows, N);
  const at::Tensor kl_c = kl_coef.to(at::kFloat).contiguous(), mlm_c = mlm_coef.to(at::kFloat).contiguous();
  at::Tensor kl = at::empty({N}, student_logits.options().dtype(at::kFloat));
  at::Tensor ce = at::empty({N}, student_logits.options().dtype(at::kFloat));
  if (N == 0) return {kl, ce};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "distill_epilogue_cuda", [&] {
    distill_epilogue_kernel<scalar_t><<<N, kThreads, 0, stream>>>(
        student_logits.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), rows.defined() ? rows.data_ptr<bool>() : nullptr,
        lab.defined() ? lab.data_ptr<int64_t>() : nullptr, kl_c.data_ptr<float>(), mlm_c.data_ptr<float>(),
        kl.data_ptr<float>(), ce.data_ptr<float>(), V, float(1.0 / temperature), with_grad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {kl, ce};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistil, CUDA, m) { m.impl("_distill_epilogue_cuda", &distill_epilogue_cuda); }

}  // namespace fastdistil
