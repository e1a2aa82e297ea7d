// Output allocation for the CPU kernels: large gradients come from a small cache of huge-page blocks.
//
// A fresh (N, V) gradient is hundreds of MB. Memory fresh from the OS costs a page fault per page and a
// kernel-side zeroing of every byte: measured here, faulting in 500 MB took longer than the whole KL
// backward, and zeroing alone costs about as much as writing the gradient. So large outputs are
//  - 2 MiB-aligned and madvise(MADV_HUGEPAGE)d: one fault per 2 MiB where transparent huge pages are
//    enabled ("madvise" or "always"; elsewhere the hint is a no-op), and
//  - returned to a small cache when freed, so the next training step reuses the same resident pages
//    (the CPU analogue of the CUDA caching allocator). fastdistil._C.empty_cache() releases it.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace fastdistil {

// An uninitialised contiguous tensor shaped and typed like `like`.
at::Tensor empty_for_output(const at::Tensor& like);

// Frees every cached block; returns the bytes released.
size_t empty_output_cache();

// Bytes currently held by the cache (not in use by any tensor).
size_t cached_output_bytes();

}  // namespace fastdistil
