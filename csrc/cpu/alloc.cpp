// The output-buffer cache of csrc/cpu/alloc.h.
#include "alloc.h"

#include <cstdlib>
#include <mutex>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastdistil {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMinCached = 8 * kHuge;  // smaller buffers: the ordinary allocator is fine
constexpr size_t kMaxBlocks = 4;          // a training step needs one or two; more would just hoard memory

struct Block {
  void* ptr;
  size_t bytes;
};

struct Cache {
  std::mutex mutex;
  std::vector<Block> free_blocks;
};

Cache& cache() {
  static Cache* c = new Cache();  // leaked on purpose: deleters may run during interpreter shutdown
  return *c;
}

// The newest block is kept; past kMaxBlocks the oldest goes back to the OS. (Refusing the newest instead
// would let a few stale sizes from earlier work block the cache for the shapes in use now.)
void release(void* ptr, size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.free_blocks.push_back({ptr, bytes});
  if (c.free_blocks.size() > kMaxBlocks) {
    std::free(c.free_blocks.front().ptr);
    c.free_blocks.erase(c.free_blocks.begin());
  }
}

void* acquire(size_t bytes) {
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    for (size_t i = 0; i < c.free_blocks.size(); ++i) {
      if (c.free_blocks[i].bytes == bytes) {
        void* ptr = c.free_blocks[i].ptr;
        c.free_blocks.erase(c.free_blocks.begin() + i);
        return ptr;
      }
    }
  }
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kHuge, bytes) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(ptr, bytes, MADV_HUGEPAGE);  // a hint: failure leaves ordinary pages
#endif
  return ptr;
}

}  // namespace

at::Tensor empty_for_output(const at::Tensor& like) {
  const size_t bytes = size_t(like.numel()) * like.element_size();
  if (bytes < kMinCached) return at::empty(like.sizes(), like.options());
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* ptr = acquire(rounded);
  if (ptr == nullptr) return at::empty(like.sizes(), like.options());
  return at::from_blob(ptr, like.sizes(), [rounded](void* p) { release(p, rounded); }, like.options());
}

size_t empty_output_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  size_t released = 0;
  for (const Block& b : c.free_blocks) {
    std::free(b.ptr);
    released += b.bytes;
  }
  c.free_blocks.clear();
  return released;
}

size_t cached_output_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  size_t total = 0;
  for (const Block& b : c.free_blocks) total += b.bytes;
  return total;
}

}  // namespace fastdistil
