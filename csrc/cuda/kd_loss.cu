// CUDA kernels for fastdistil::_kd_loss_{fwd,bwd}_cuda.
// Spec: kd_loss_fwd_ref / kd_loss_bwd_ref in fastdistil/ops/kd_loss.py; per-row math in
// csrc/common/fd_math.h (the CPU kernels in csrc/cpu/kd_loss.cpp run the same functions, so CPU
// tests exercise it); tests in tests/ops/test_kd_loss.py (cuda_cpp rows).
//
// Forward: one block per row. Each thread keeps online states for s/T and t/T over a strided
// slice of the row (one read of each logit), the block merges them; with a gradient requested, a
// second sweep writes (q - p)/T. Backward: scales the gradient rows in place.
// Row offsets are int64: N * V passes 2^31 at 70k tokens.
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

// Per-thread state: the student's online (m, d); the teacher's (m, d) and the p-weighted (t - s)/T
// sum w, relative to the teacher's m. Merged across the block with the functions of fd_math.h.
struct KdState {
  float ms, ds, mt, dt, w;
};

__device__ __forceinline__ KdState kd_merge(KdState a, KdState b) {
  const OnlineLse<float> s = lse_merge(OnlineLse<float>{a.ms, a.ds}, b.ms, b.ds);
  const KdTeacher<float> t = kd_teacher_merge(KdTeacher<float>{a.mt, a.dt, a.w}, b.mt, b.dt, b.w);
  return {s.m, s.d, t.m, t.d, t.w};
}

template <typename scalar_t, typename acc_t, bool kWithGrad>
__global__ void kd_loss_fwd_kernel(const scalar_t* __restrict__ s_ptr, const scalar_t* __restrict__ t_ptr,
                                   const bool* __restrict__ mask_ptr, acc_t* __restrict__ loss_ptr,
                                   scalar_t* __restrict__ grad_ptr, int64_t V, float inv_temperature) {
  const int64_t row = blockIdx.x;
  if (mask_ptr != nullptr && !mask_ptr[row]) {  // unselected rows are never read; exact zero gradient
    if (threadIdx.x == 0) loss_ptr[row] = acc_t(0);
    if constexpr (kWithGrad)
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) grad_ptr[row * V + v] = scalar_t(0);
    return;
  }
  const scalar_t* s_row = s_ptr + row * V;
  const scalar_t* t_row = t_ptr + row * V;
  KdState st{-INFINITY, 0.f, -INFINITY, 0.f, 0.f};
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float s_raw = static_cast<float>(s_row[v]), t_raw = static_cast<float>(t_row[v]);
    const float s = s_raw * inv_temperature, t = t_raw * inv_temperature;
    const OnlineLse<float> sn = lse_merge(OnlineLse<float>{st.ms, st.ds}, s, 1.f);
    // Each element is a block of one: its sum relative to itself is 1 (0 when it is -inf).
    const float e_t = t == -INFINITY ? 0.f : 1.f;
    const KdTeacher<float> tn = kd_teacher_merge(KdTeacher<float>{st.mt, st.dt, st.w}, t, e_t,
                                                 kd_weighted_term(e_t, s_raw, t_raw, inv_temperature, -INFINITY, 0.f));
    st = {sn.m, sn.d, tn.m, tn.d, tn.w};
  }
  st = block_reduce(st, kd_merge, KdState{-INFINITY, 0.f, -INFINITY, 0.f, 0.f});
  const OnlineLse<float> student{st.ms, st.ds};
  const KdTeacher<float> teacher{st.mt, st.dt, st.w};
  if (threadIdx.x == 0) loss_ptr[row] = kd_row_loss(teacher, student);
  if constexpr (kWithGrad) {
    // Second sweep over the row (mostly from L2): d KL / d s = (q - p) / T.
    const float lse_s = lse_value(student), lse_t = lse_value(teacher);
    scalar_t* g_row = grad_ptr + row * V;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
      g_row[v] = static_cast<scalar_t>(kd_grad(static_cast<float>(s_row[v]), static_cast<float>(t_row[v]),
                                               inv_temperature, lse_s, lse_t, inv_temperature));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void kd_loss_bwd_kernel(const acc_t* __restrict__ grad_loss, scalar_t* __restrict__ grad_ptr, int64_t V) {
  const int64_t row = blockIdx.x;  // rows on x: gridDim.y is capped at 65535
  const int64_t v = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (v < V) {
    scalar_t* g = grad_ptr + row * V + v;
    *g = static_cast<scalar_t>(static_cast<acc_t>(*g) * grad_loss[row]);
  }
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                                    double temperature, const std::optional<at::Tensor>& row_mask,
                                                    bool with_grad) {
  check_student_teacher(student_logits, teacher_logits);
  const c10::cuda::CUDAGuard device_guard(student_logits.device());  // launch on the tensor's GPU
  const at::Tensor s = student_logits.contiguous(), t = teacher_logits.contiguous();
  const int64_t N = s.size(0), V = s.size(1);
  const at::Tensor mask = checked_row_mask(row_mask, N);
  at::Tensor loss = at::empty({N}, s.options().dtype(at::toOpMathType(s.scalar_type())));
  at::Tensor grad = with_grad ? at::empty_like(s) : at::empty({0}, s.options());
  if (N == 0) return {loss, grad};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // never the default stream
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "kd_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool* m = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    const float inv_t = float(1.0 / temperature);
    if (with_grad) {
      kd_loss_fwd_kernel<scalar_t, acc_t, true><<<N, kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), m, loss.data_ptr<acc_t>(), grad.data_ptr<scalar_t>(), V, inv_t);
    } else {
      kd_loss_fwd_kernel<scalar_t, acc_t, false><<<N, kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), m, loss.data_ptr<acc_t>(), nullptr, V, inv_t);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad};
}

void kd_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_logits) {
  FD_CHECK_2D(grad_logits);
  TORCH_CHECK(grad_logits.is_contiguous(), "grad_logits must be contiguous");
  const c10::cuda::CUDAGuard device_guard(grad_logits.device());
  const int64_t N = grad_logits.size(0), V = grad_logits.size(1);
  const at::Tensor g = grad_loss.to(at::toOpMathType(grad_logits.scalar_type())).contiguous();
  if (N == 0 || V == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(N, (V + 255) / 256);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_logits.scalar_type(), "kd_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kd_loss_bwd_kernel<scalar_t, acc_t><<<grid, 256, 0, stream>>>(g.data_ptr<acc_t>(), grad_logits.data_ptr<scalar_t>(), V);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistil, CUDA, m) {
  m.impl("_kd_loss_fwd_cuda", &kd_loss_fwd_cuda);
  m.impl("_kd_loss_bwd_cuda", &kd_loss_bwd_cuda);
}

}  // namespace fastdistil
