// The packing and the CPU check of bf16_gemm.h: plain C++, built without
// ISA flags (they run before anything knows what the CPU has).
#include "bf16_gemm.h"

#include <cstring>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace rnnfast::cpu::bf16 {

#if defined(__x86_64__) && defined(__linux__)
namespace {

// Linux keeps AMX's tile data out of a process's saved state until the
// process asks for it (arch_prctl, Linux 5.16+).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool cpu_and_os_have_amx_bf16() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
  if (!amx_tile || !amx_bf16) return false;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !((ecx >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((lo >> 17) & 1u) && ((lo >> 18) & 1u);  // XTILECFG, XTILEDATA enabled
}

}  // namespace

bool amx_bf16_supported() {
  static const bool supported = cpu_and_os_have_amx_bf16() &&
                                syscall(SYS_arch_prctl, kArchReqXcompPerm,
                                        kXfeatureXtiledata) == 0;
  return supported;
}
#else
bool amx_bf16_supported() { return false; }
#endif

void pack(bool trans_b, int64_t n, int64_t k, const uint16_t* b, int64_t ldb,
          uint16_t* packed) {
  const int64_t kp = padded_depth(k);
  std::memset(packed, 0, sizeof(uint16_t) * packed_elements(n, k));
  for (int64_t j = 0; j < n; ++j) {
    uint16_t* block = packed + (j / kBlockCols) * kBlockCols * kp;
    const int64_t col = j % kBlockCols;
    for (int64_t d = 0; d < k; ++d) {
      // op(B)[d, j]
      const uint16_t v = trans_b ? b[j * ldb + d] : b[d * ldb + j];
      block[(d / 2) * 2 * kBlockCols + col * 2 + (d % 2)] = v;
    }
  }
}

}  // namespace rnnfast::cpu::bf16
