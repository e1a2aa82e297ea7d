// CUDA kernels for fastdistil::_kd_loss_{fwd,bwd}_cuda.
// Spec: kd_loss_fwd_ref / kd_loss_bwd_ref in fastdistil/ops/kd_loss.py; per-row math in
// csrc/common/fd_math.h (the CPU kernels in csrc/cpu/kd_loss.cpp run the same functions, so CPU
// tests exercise it); tests in tests/ops/test_kd_loss.py (cuda_cpp rows).
//
// Forward: one block per row. Each thread keeps online states for s/T and t/T over a strided
// slice of the row (one read of each logit), the block merges them. Backward: one block per row,
// elementwise from the saved log-sum-exps. Row offsets are int64: N * V passes 2^31 at 70k tokens.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../common/fd_math.h"
#include "reduce.cuh"

namespace fastdistil {
namespace {

constexpr int kThreads = 512;

// Per-thread state: student (m, d); teacher (m, d) and the p-weighted (t - s)/T sum w, which is
// relative to the teacher's max and rescaled with d.
struct KdState {
  float ms, ds, mt, dt, w;
};

__device__ __forceinline__ KdState kd_merge(KdState a, KdState b) {
  const OnlineLse<float> s = lse_merge(OnlineLse<float>{a.ms, a.ds}, b.ms, b.ds);
  KdState r;
  r.ms = s.m;
  r.ds = s.d;
  r.mt = fd_max(a.mt, b.mt);
  if (r.mt == -INFINITY) {
    r.dt = 0.f;
    r.w = 0.f;
  } else {
    const float ca = fd_exp(a.mt - r.mt), cb = fd_exp(b.mt - r.mt);
    r.dt = a.dt * ca + b.dt * cb;
    r.w = a.w * ca + b.w * cb;
  }
  return r;
}

template <typename scalar_t, typename acc_t>
__global__ void kd_loss_fwd_kernel(const scalar_t* __restrict__ s_ptr, const scalar_t* __restrict__ t_ptr,
                                   const bool* __restrict__ mask_ptr, acc_t* __restrict__ loss_ptr,
                                   acc_t* __restrict__ s_lse_ptr, acc_t* __restrict__ t_lse_ptr, int64_t V,
                                   float inv_temperature) {
  const int64_t row = blockIdx.x;
  if (mask_ptr != nullptr && !mask_ptr[row]) {  // unselected rows are never read
    if (threadIdx.x == 0) loss_ptr[row] = s_lse_ptr[row] = t_lse_ptr[row] = acc_t(0);
    return;
  }
  const scalar_t* s_row = s_ptr + row * V;
  const scalar_t* t_row = t_ptr + row * V;
  KdState st{-INFINITY, 0.f, -INFINITY, 0.f, 0.f};
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float s_raw = static_cast<float>(s_row[v]), t_raw = static_cast<float>(t_row[v]);
    const float s = s_raw * inv_temperature, t = t_raw * inv_temperature;
    const OnlineLse<float> sn = lse_merge(OnlineLse<float>{st.ms, st.ds}, s, 1.f);
    st.ms = sn.m;
    st.ds = sn.d;
    const float mt = fd_max(st.mt, t);
    if (mt != -INFINITY) {
      const float rescale = fd_exp(st.mt - mt), e = fd_exp(t - mt);
      st.dt = st.dt * rescale + e;
      st.w = st.w * rescale + kd_weighted_term(e, s_raw, t_raw, inv_temperature, -INFINITY, 0.f);
      st.mt = mt;
    }
  }
  st = block_reduce(st, kd_merge, KdState{-INFINITY, 0.f, -INFINITY, 0.f, 0.f});
  if (threadIdx.x == 0) {
    const OnlineLse<float> student{st.ms, st.ds}, teacher{st.mt, st.dt};
    loss_ptr[row] = kd_row_loss(st.w, teacher, student);
    s_lse_ptr[row] = lse_value(student);
    t_lse_ptr[row] = lse_value(teacher);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void kd_loss_bwd_kernel(const acc_t* __restrict__ grad_loss, const scalar_t* __restrict__ s_ptr,
                                   const scalar_t* __restrict__ t_ptr, const acc_t* __restrict__ s_lse_ptr,
                                   const acc_t* __restrict__ t_lse_ptr, const bool* __restrict__ mask_ptr,
                                   scalar_t* __restrict__ grad_ptr, int64_t V, acc_t inv_temperature) {
  const int64_t row = blockIdx.x;
  scalar_t* g_row = grad_ptr + row * V;
  if (mask_ptr != nullptr && !mask_ptr[row]) {  // exact zeros, even where the unselected row holds NaN
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) g_row[v] = scalar_t(0);
    return;
  }
  const scalar_t* s_row = s_ptr + row * V;
  const scalar_t* t_row = t_ptr + row * V;
  const acc_t lse_s = s_lse_ptr[row], lse_t = t_lse_ptr[row], scale = grad_loss[row] * inv_temperature;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
    g_row[v] = static_cast<scalar_t>(kd_grad(static_cast<acc_t>(s_row[v]), static_cast<acc_t>(t_row[v]),
                                             inv_temperature, lse_s, lse_t, scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cuda(const at::Tensor& student_logits,
                                                                const at::Tensor& teacher_logits, double temperature,
                                                                const std::optional<at::Tensor>& row_mask) {
  FD_CHECK_2D(student_logits);
  FD_CHECK_SAME_SHAPE(student_logits, teacher_logits);
  FD_CHECK_SAME_DTYPE(student_logits, teacher_logits);
  FD_CHECK_FLOATING(student_logits);
  const c10::cuda::CUDAGuard device_guard(student_logits.device());  // launch on the tensor's GPU
  const at::Tensor s = student_logits.contiguous(), t = teacher_logits.contiguous();
  const int64_t N = s.size(0), V = s.size(1);
  const at::Tensor mask = checked_row_mask(row_mask, N);
  const auto acc = s.options().dtype(at::toOpMathType(s.scalar_type()));
  at::Tensor loss = at::empty({N}, acc), s_lse = at::empty({N}, acc), t_lse = at::empty({N}, acc);
  if (N == 0) return {loss, s_lse, t_lse};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // never the default stream
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "kd_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kd_loss_fwd_kernel<scalar_t, acc_t><<<N, kThreads, 0, stream>>>(
        s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
        loss.data_ptr<acc_t>(), s_lse.data_ptr<acc_t>(), t_lse.data_ptr<acc_t>(), V, float(1.0 / temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, s_lse, t_lse};
}

at::Tensor kd_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                            const at::Tensor& teacher_logits, const at::Tensor& student_lse,
                            const at::Tensor& teacher_lse, double temperature,
                            const std::optional<at::Tensor>& row_mask) {
  FD_CHECK_2D(student_logits);
  FD_CHECK_SAME_SHAPE(student_logits, teacher_logits);
  const c10::cuda::CUDAGuard device_guard(student_logits.device());
  const at::Tensor s = student_logits.contiguous(), t = teacher_logits.contiguous();
  const int64_t N = s.size(0), V = s.size(1);
  const auto acc_type = at::toOpMathType(s.scalar_type());
  const at::Tensor g = grad_loss.to(acc_type).contiguous(), ls = student_lse.to(acc_type).contiguous(),
                   lt = teacher_lse.to(acc_type).contiguous();
  const at::Tensor mask = checked_row_mask(row_mask, N);
  at::Tensor grad = at::empty_like(s);
  if (N == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "kd_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kd_loss_bwd_kernel<scalar_t, acc_t><<<N, kThreads, 0, stream>>>(
        g.data_ptr<acc_t>(), s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), ls.data_ptr<acc_t>(),
        lt.data_ptr<acc_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr, grad.data_ptr<scalar_t>(), V,
        acc_t(1.0 / temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistil, CUDA, m) {
  m.impl("_kd_loss_fwd_cuda", &kd_loss_fwd_cuda);
  m.impl("_kd_loss_bwd_cuda", &kd_loss_bwd_cuda);
}

}  // namespace fastdistil
