// Output allocation for the CPU kernels.
//
// A fresh (N, V) gradient is hundreds of MB, and the first write to each 4 KiB page of it costs a page
// fault: measured here, faulting in 500 MB took longer than computing the whole KL backward. Large
// outputs are therefore 2 MiB-aligned and madvise(MADV_HUGEPAGE)d, so the kernel takes one fault per
// 2 MiB instead of one per 4 KiB wherever transparent huge pages are enabled ("madvise" or "always");
// elsewhere the hint is a no-op and behaviour is that of at::empty.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastdistil {

inline at::Tensor empty_for_output(const at::Tensor& like) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = size_t(like.numel()) * like.element_size();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= 8 * kHuge) {
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHuge, rounded) == 0) {
      madvise(ptr, rounded, MADV_HUGEPAGE);  // a hint: failure leaves ordinary pages
      return at::from_blob(ptr, like.sizes(), [](void* p) { std::free(p); }, like.options());
    }
  }
#endif
  return at::empty(like.sizes(), like.options());
}

}  // namespace fastdistil
