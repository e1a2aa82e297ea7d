// CUDA kernels for fastdistil::_cosine_loss_{fwd,bwd}_cuda.
// Spec: cosine_loss_fwd_ref / cosine_loss_bwd_ref in fastdistil/ops/cosine_loss.py; per-row math in
// csrc/common/fd_math.h (shared with csrc/cpu/cosine_loss.cpp); tests in tests/ops/test_cosine_loss.py.
//
// One warp per row (hidden sizes are 128..1024: a block per row would idle most threads).
// Forward: the warp accumulates <s,t>, |s|^2, |t|^2 and reduces with shuffles. Backward: the warp
// reads the saved statistics and writes both gradients.
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

constexpr int kWarpsPerBlock = 8;

struct CosState {
  float dot, ss, tt;
};

__device__ __forceinline__ CosState cos_merge(CosState a, CosState b) {
  return {a.dot + b.dot, a.ss + b.ss, a.tt + b.tt};
}

template <typename scalar_t, typename acc_t>
__global__ void cosine_loss_fwd_kernel(const scalar_t* __restrict__ s_ptr, const scalar_t* __restrict__ t_ptr,
                                       const bool* __restrict__ mask_ptr, acc_t* __restrict__ loss_ptr,
                                       acc_t* __restrict__ stats_ptr, int64_t N, int64_t H) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= N) return;  // whole warps exit together: the shuffles below stay convergent
  acc_t* st = stats_ptr + 3 * row;
  if (mask_ptr != nullptr && !mask_ptr[row]) {
    if (lane == 0) loss_ptr[row] = st[0] = st[1] = st[2] = acc_t(0);
    return;
  }
  const scalar_t* s_row = s_ptr + row * H;
  const scalar_t* t_row = t_ptr + row * H;
  CosState acc{0.f, 0.f, 0.f};
  for (int64_t i = lane; i < H; i += 32) {
    const float s = static_cast<float>(s_row[i]), t = static_cast<float>(t_row[i]);
    acc.dot = fmaf(s, t, acc.dot);
    acc.ss = fmaf(s, s, acc.ss);
    acc.tt = fmaf(t, t, acc.tt);
  }
  acc = warp_reduce(acc, cos_merge);
  if (lane == 0) {
    st[0] = acc.dot;
    st[1] = acc.ss;
    st[2] = acc.tt;
    loss_ptr[row] = cosine_row_loss(acc.dot, acc.ss, acc.tt);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void cosine_loss_bwd_kernel(const acc_t* __restrict__ grad_loss, const scalar_t* __restrict__ s_ptr,
                                       const scalar_t* __restrict__ t_ptr, const acc_t* __restrict__ stats_ptr,
                                       const bool* __restrict__ mask_ptr, scalar_t* __restrict__ gs_ptr,
                                       scalar_t* __restrict__ gt_ptr, int64_t N, int64_t H) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= N) return;
  const scalar_t* s_row = s_ptr + row * H;
  const scalar_t* t_row = t_ptr + row * H;
  scalar_t* gs_row = gs_ptr != nullptr ? gs_ptr + row * H : nullptr;  // null: that side needs no gradient
  scalar_t* gt_row = gt_ptr != nullptr ? gt_ptr + row * H : nullptr;
  const bool masked = mask_ptr != nullptr && !mask_ptr[row];
  const acc_t* st = stats_ptr + 3 * row;
  const CosineCoefs<acc_t> c = masked ? CosineCoefs<acc_t>{0, 0, 0} : cosine_grad_coefs(st[0], st[1], st[2], grad_loss[row]);
  for (int64_t i = lane; i < H; i += 32) {
    const acc_t s = masked ? acc_t(0) : static_cast<acc_t>(s_row[i]);  // unselected rows are never read
    const acc_t t = masked ? acc_t(0) : static_cast<acc_t>(t_row[i]);
    if (gs_row != nullptr) gs_row[i] = static_cast<scalar_t>(cosine_grad(s, t, c.self_a, c.other));
    if (gt_row != nullptr) gt_row[i] = static_cast<scalar_t>(cosine_grad(t, s, c.self_b, c.other));
  }
}

std::tuple<at::Tensor, at::Tensor> cosine_loss_fwd_cuda(const at::Tensor& student_hidden,
                                                        const at::Tensor& teacher_hidden,
                                                        const std::optional<at::Tensor>& row_mask) {
  check_student_teacher(student_hidden, teacher_hidden);
  const c10::cuda::CUDAGuard device_guard(student_hidden.device());
  const at::Tensor s = student_hidden.contiguous(), t = teacher_hidden.contiguous();
  const int64_t N = s.size(0), H = s.size(1);
  const at::Tensor mask = checked_row_mask(row_mask, N);
  const auto acc = s.options().dtype(at::toOpMathType(s.scalar_type()));
  at::Tensor loss = at::empty({N}, acc), stats = at::empty({N, 3}, acc);
  if (N == 0) return {loss, stats};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "cosine_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cosine_loss_fwd_kernel<scalar_t, acc_t><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
        s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
        loss.data_ptr<acc_t>(), stats.data_ptr<acc_t>(), N, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> cosine_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& student_hidden,
                                                        const at::Tensor& teacher_hidden, const at::Tensor& stats,
                                                        const std::optional<at::Tensor>& row_mask, bool student_grad,
                                                        bool teacher_grad) {
  check_student_teacher(student_hidden, teacher_hidden);
  const c10::cuda::CUDAGuard device_guard(student_hidden.device());
  const at::Tensor s = student_hidden.contiguous(), t = teacher_hidden.contiguous();
  const int64_t N = s.size(0), H = s.size(1);
  const auto acc_type = at::toOpMathType(s.scalar_type());
  const at::Tensor g = grad_loss.to(acc_type).contiguous(), st = stats.to(acc_type).contiguous();
  const at::Tensor mask = checked_row_mask(row_mask, N);
  at::Tensor grad_s = student_grad ? at::empty_like(s) : at::empty({0}, s.options());
  at::Tensor grad_t = teacher_grad ? at::empty_like(t) : at::empty({0}, t.options());
  if (N == 0) return {grad_s, grad_t};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "cosine_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cosine_loss_bwd_kernel<scalar_t, acc_t><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
        g.data_ptr<acc_t>(), s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), st.data_ptr<acc_t>(),
        mask.defined() ? mask.data_ptr<bool>() : nullptr, student_grad ? grad_s.data_ptr<scalar_t>() : nullptr,
        teacher_grad ? grad_t.data_ptr<scalar_t>() : nullptr, N, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_s, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistil, CUDA, m) {
  m.impl("_cosine_loss_fwd_cuda", &cosine_loss_fwd_cuda);
  m.impl("_cosine_loss_bwd_cuda", &cosine_loss_bwd_cuda);
}

}  // namespace fastdistil
