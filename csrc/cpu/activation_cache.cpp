#include "activation_cache.h"

#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace rnnfast::cpu {
namespace {

int64_t limit_from_environment() {
  const char* env = std::getenv("RNNFAST_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return int64_t{1024} << 20;
  try {
    const long long mb = std::stoll(env);
    return mb > 0 ? static_cast<int64_t>(mb) << 20 : 0;
  } catch (const std::exception&) {
    TORCH_WARN("rnnfast: RNNFAST_CPU_CACHE_MB=", env,
               " is not a number of megabytes; using the default (1024)");
    return int64_t{1024} << 20;
  }
}

class BlockCache {
 public:
  // A block of at least `bytes` (and at most twice that), or null.
  void* take(size_t bytes, size_t* block_bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(bytes);
    if (it == free_.end() || it->first > 2 * bytes) return nullptr;
    void* ptr = it->second;
    *block_bytes = it->first;
    cached_ -= static_cast<int64_t>(it->first);
    free_.erase(it);
    return ptr;
  }

  // Keeps a freed block when it fits under the limit, else frees it.
  void give(void* ptr, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + static_cast<int64_t>(bytes) <= limit_) {
        free_.emplace(bytes, ptr);
        cached_ += static_cast<int64_t>(bytes);
        return;
      }
    }
    c10::free_cpu(ptr);
  }

  int64_t release() {
    std::multimap<size_t, void*> blocks;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      bytes = cached_;
      cached_ = 0;
    }
    for (auto& b : blocks) c10::free_cpu(b.second);
    return bytes;
  }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

  bool enabled() const { return limit_ > 0; }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // block size -> block
  int64_t cached_ = 0;
  const int64_t limit_ = limit_from_environment();
};

// Never destroyed: tensors may return blocks during static destruction.
BlockCache& cache() {
  static BlockCache* c = new BlockCache();
  return *c;
}

}  // namespace

at::Tensor empty_activation(at::IntArrayRef sizes,
                            const at::TensorOptions& options) {
  TORCH_CHECK(options.device().type() == c10::DeviceType::CPU,
              "rnnfast: internal error: the CPU buffer cache was asked for ",
              options.device(), " memory");
  if (!cache().enabled()) return at::empty(sizes, options);
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                       options.dtype().itemsize();
  if (bytes < static_cast<size_t>(kMinCachedBytes)) {
    return at::empty(sizes, options);
  }
  size_t block_bytes = bytes;
  void* ptr = cache().take(bytes, &block_bytes);
  if (ptr == nullptr) ptr = c10::alloc_cpu(block_bytes);
  return at::from_blob(
      ptr, sizes, [block_bytes](void* p) { cache().give(p, block_bytes); },
      options);
}

int64_t empty_activation_cache() { return cache().release(); }

int64_t activation_cache_bytes() { return cache().cached(); }

}  // namespace rnnfast::cpu
