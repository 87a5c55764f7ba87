// Bernoulli masks for the recurrent regularisers (zoneout, DropConnect,
// variational dropout) on the CPU, from a counter-based generator.
//
// torch's CPU generator (mt19937) produces its numbers one after another on
// one thread, about 6 ns per 32-bit draw here: for zoneout at T=100 B=64
// H=256 that was 10-20 ms per training step, most of zoneout's cost. Here
// every 64-bit word is a hash of (seed, word index) (SplitMix64's finaliser
// over a Weyl sequence), so the words are independent of each other and of
// the thread that computes them: the masks depend on the seed only, whatever
// the number of threads. The seed is drawn from torch's default generator by
// the caller (rnnfast.functional), so torch.manual_seed reproduces a run.
//
// Each element takes 16 bits of the stream per mask, and is true when those
// bits, read as an unsigned number u, satisfy u < round(p * 2^16): a
// Bernoulli(p) to a resolution of 2^-16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

TORCH_LIBRARY_FRAGMENT(rnnfast, m) {
  // masks[j] (a bool tensor of shape [len(rates), *shape], row j true with
  // probability rates[j], to 2^-16) from the 64-bit seed (an int64 tensor of
  // one element, on the CPU).
  m.def("bernoulli_masks(Tensor seed, SymInt[] shape, float[] rates) -> Tensor");
}

namespace rnnfast::cpu {
namespace {

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

at::Tensor bernoulli_masks(const at::Tensor& seed, at::IntArrayRef shape,
                           at::ArrayRef<double> rates) {
  constexpr const char* op = "rnnfast.bernoulli_masks";
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong &&
                  seed.numel() == 1,
              op, ": seed must be an int64 CPU tensor of one element, got a ",
              seed.scalar_type(), " tensor of ", seed.numel(), " elements on ",
              seed.device());
  const int64_t k = static_cast<int64_t>(rates.size());
  TORCH_CHECK(k >= 1, op, ": expected at least one rate");
  std::vector<uint32_t> threshold(k);
  for (int64_t j = 0; j < k; ++j) {
    const double p = rates[j];
    TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": every rate must be in [0, 1), got ", p);
    // at most 2^16 - 1, as for any p < 1: a mask never true everywhere
    threshold[j] = static_cast<uint32_t>(std::min(std::lround(p * 65536.0), 65535L));
  }
  std::vector<int64_t> out_shape{k};
  out_shape.insert(out_shape.end(), shape.begin(), shape.end());
  at::Tensor out = at::empty(out_shape, at::TensorOptions().dtype(at::kBool));
  int64_t n = 1;
  for (const int64_t s : shape) {
    TORCH_CHECK(s >= 0, op, ": negative size in shape ", shape);
    n *= s;
  }
  if (n == 0) return out;
  const uint64_t key = mix64(static_cast<uint64_t>(seed.item<int64_t>()));
  bool* masks = out.data_ptr<bool>();
  const uint32_t* thr = threshold.data();
  // Mask j takes words [j * W, (j + 1) * W) of the stream (W = n / 4
  // rounded up), element e the 16 bits 16 (e % 4) onwards of its word
  // j * W + e / 4. The words split over the threads: each is a hash of its
  // index, with no shared state.
  const int64_t per_mask = (n + 3) / 4;
  constexpr int64_t kGrain = 1 << 12;
  at::parallel_for(0, k * per_mask, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t j = w / per_mask, e0 = (w - j * per_mask) * 4;
      const uint64_t bits = mix64(key + static_cast<uint64_t>(w) * 0x9E3779B97F4A7C15ull);
      bool* row = masks + j * n;
      const uint32_t t = thr[j];
      if (e0 + 4 <= n) {
        row[e0] = static_cast<uint32_t>(bits & 0xFFFFu) < t;
        row[e0 + 1] = static_cast<uint32_t>((bits >> 16) & 0xFFFFu) < t;
        row[e0 + 2] = static_cast<uint32_t>((bits >> 32) & 0xFFFFu) < t;
        row[e0 + 3] = static_cast<uint32_t>(bits >> 48) < t;
      } else {
        for (int64_t q = 0; e0 + q < n; ++q) {
          row[e0 + q] = static_cast<uint32_t>((bits >> (16 * q)) & 0xFFFFu) < t;
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace rnnfast::cpu

TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("bernoulli_masks", &rnnfast::cpu::bernoulli_masks);
}
