// Block-wide reductions of small per-thread states for the CUDA kernels: warp shuffles, then one
// shared-memory round. `merge(a, b)` must be associative with `identity` as its neutral element;
// State is a small struct of 4-byte fields.
#pragma once
#include <cuda_runtime.h>

namespace fastdistil {

template <typename State, typename Merge>
__device__ __forceinline__ State warp_reduce(State s, Merge merge) {
  static_assert(sizeof(State) % sizeof(float) == 0, "State must be made of 4-byte fields");
  constexpr int kWords = sizeof(State) / sizeof(float);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    State other;
    const float* src = reinterpret_cast<const float*>(&s);
    float* dst = reinterpret_cast<float*>(&other);
#pragma unroll
    for (int w = 0; w < kWords; ++w) dst[w] = __shfl_xor_sync(0xffffffffu, src[w], offset);
    s = merge(s, other);
  }
  return s;
}

// Every thread of the block gets the reduced state. blockDim.x: a multiple of 32, at most 1024.
template <typename State, typename Merge>
__device__ __forceinline__ State block_reduce(State s, Merge merge, State identity) {
  __shared__ State partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  s = warp_reduce(s, merge);
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  if (warp == 0) {
    State r = lane < n_warps ? partial[lane] : identity;
    r = warp_reduce(r, merge);
    if (lane == 0) partial[0] = r;
  }
  __syncthreads();
  const State out = partial[0];
  __syncthreads();  // partial[] may be reused by a following reduction
  return out;
}

}  // namespace fastdistil
