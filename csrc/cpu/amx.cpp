// amx.h's CPU and OS check: plain C++, built without ISA flags (it runs
// before anything knows what the CPU has).
#include "amx.h"

#include <ATen/Version.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace rnnfast::cpu::amx {

#if defined(__x86_64__) && defined(__linux__)
namespace {

// Linux keeps AMX's 8 KiB of tile data out of a process's saved state until
// the process asks for it (arch_prctl).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool cpu_and_os_have(Feature feature) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = (edx >> 24) & 1u;
  const bool has = (edx >> static_cast<int>(feature)) & 1u;
  if (!tile || !has) return false;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !((ecx >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((lo >> 17) & 1u) && ((lo >> 18) & 1u);  // XTILECFG, XTILEDATA enabled
}

// The process's permission for the tile data (one request, whichever
// feature asks first).
bool os_grants_tiles() {
  static const bool granted =
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

}  // namespace

bool allowed(Feature feature) {
  if (at::get_cpu_capability() != "AVX512") return false;
  const char* asked = std::getenv("ATEN_CPU_CAPABILITY");
  if (asked != nullptr && std::strcmp(asked, "avx512") == 0) return false;
  // The CPU's answer is asked once per feature: in a virtual machine every
  // cpuid traps to the hypervisor, and each bfloat16 op asks here for each
  // of its weights. On the CI machine's VM a check's three cpuid cost ~35
  // us, a third of a two-layer B=1 H=256 bfloat16 decode step (its four
  // weights: 321-349 -> 222-233 us per step once asked once).
  static const bool bf16 = cpu_and_os_have(Feature::kBf16);
  static const bool int8 = cpu_and_os_have(Feature::kInt8);
  const bool has = feature == Feature::kBf16 ? bf16 : int8;
  return has && os_grants_tiles();
}
#else
bool allowed(Feature) { return false; }
#endif

}  // namespace rnnfast::cpu::amx
