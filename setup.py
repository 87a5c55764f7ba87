"""Build of rnnfast's C++/CUDA extension, rnnfast._C.

The C++ CPU kernels are always built. The CUDA backend (kernels in
csrc/cuda/*.cu, their host code in csrc/cuda/*.cpp) is added whenever torch is
a CUDA build and a CUDA toolkit is found, whether or not a GPU is visible, so
CI without a GPU still compiles it.

Environment:
  RNNFAST_SKIP_CUDA=1      build the CPU kernels only
  RNNFAST_FORCE_CUDA=1     fail unless the CUDA kernels can be built
  CUDA_HOME                the toolkit folder (bin/nvcc, lib64); found from
                           the nvcc on PATH when unset
  TORCH_CUDA_ARCH_LIST     CUDA archs; defaults to the visible GPUs (with the
                           newest one's PTX; a GPU newer than nvcc gets the
                           newest arch nvcc knows, as PTX), or to
                           DEFAULT_CUDA_ARCHS when none is visible
  MAX_JOBS                 parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# For a build on a machine without a GPU (a CI runner, a Docker build stage),
# whose extension must then run on whatever GPU it meets: machine code for
# Turing (7.5: T4), Ampere (8.0, which 8.6 and 8.9 also run: A100, A10, L4,
# RTX 30 / 40) and Hopper (9.0: H100, H200), and Hopper's PTX, which the
# driver compiles for the GPUs after it (Blackwell: 10.x, 12.x) at first use.
# Without a PTX, those fail with "no kernel image is available". That covers
# every GPU that torch's CUDA 13 wheels support (sm_75 to sm_120).
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _is_toolkit(home):
    return (os.path.exists(os.path.join(home, "bin", "nvcc"))
            and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")))


def _find_cuda_home():
    """The toolkit folder that holds bin/nvcc, include and lib64.

    torch guesses the parent of the folder of the first nvcc on PATH, which is
    wrong when that nvcc is a symlink or a wrapper script (e.g.
    /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc): resolve the
    link, and accept a folder only if it holds the toolkit's headers too.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and _is_toolkit(home):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(home):
            return home
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _is_toolkit(home):
            return home
    return None


def _nvidia_wheel_includes(cuda_home):
    """Headers shipped by the nvidia-* wheels (cublas_v2.h, cusparse.h, ...),
    for a toolkit without cuBLAS's headers (nvcc and the runtime only, as a
    minimal install has). A full toolkit's own headers are used alone: the
    wheels' folder also holds copies of the runtime headers, of the version
    torch was built with, which would come before those of the nvcc that
    compiles."""
    if cuda_home and os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    purelib = sysconfig.get_paths()["purelib"]
    found = []
    for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
        found += sorted(glob.glob(os.path.join(purelib, pattern)))
    return found


def _cublas_link_args(cuda_home):
    """Linker arguments for cuBLAS, preferring the copy torch itself loads.

    The nvidia wheels (torch's CUDA runtime) ship only versioned files such as
    libcublas.so.13, which -lcublas cannot find, so such a file is linked by
    path; the loader then matches its soname with the library torch has
    already loaded. A toolkit's lib64/libcublas.so is the fallback.
    """
    purelib = sysconfig.get_paths()["purelib"]
    for pattern in ("nvidia/cu*/lib/libcublas.so.*", "nvidia/cublas/lib/libcublas.so.*"):
        found = sorted(glob.glob(os.path.join(purelib, pattern)), key=len)
        if found:
            return [found[0]]
    lib64 = os.path.join(cuda_home, "lib64")
    if os.path.exists(os.path.join(lib64, "libcublas.so")):
        return [f"-L{lib64}", "-lcublas"]
    warnings.warn("rnnfast: libcublas not found; relying on torch's libtorch_cuda "
                  "to bring it in at load time")
    return []


def _parse_gpu_archs(text):
    """The compute capabilities, as (major, minor), of the virtual archs that
    `nvcc --list-gpu-arch` prints (compute_75 ... compute_120; the
    arch-specific compute_90a forms are left out)."""
    return {(int(m.group(1)), int(m.group(2)))
            for m in re.finditer(r"\bcompute_(\d+)(\d)\b", text)}


def _nvcc_gpu_archs(cuda_home):
    """What this toolkit's nvcc compiles for; None when it cannot say."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return _parse_gpu_archs(out) or None


def _arch_list_for_gpus(caps, supported):
    """TORCH_CUDA_ARCH_LIST for a build on GPUs of compute capabilities
    `caps`, with an nvcc that compiles for `supported` (None: unknown, take
    the GPUs' own).

    Each GPU's own arch where nvcc knows it. A GPU newer than nvcc (a
    Blackwell with a CUDA 12.6 toolkit, say) gets the newest arch nvcc knows
    below it, as PTX, which the driver compiles for that GPU at first use:
    asking nvcc for an arch it does not know stops the build ("Unsupported
    gpu architecture"). torch.utils.cpp_extension clamps the same way, to
    torch's own arch list. The newest arch of the list gets its PTX too, so
    the build also runs on a newer GPU than the ones it was made on.
    """
    archs, ptx = set(), set()
    for cap in caps:
        if supported is None or cap in supported:
            archs.add(cap)
            continue
        below = [a for a in supported if a <= cap]
        if not below:
            raise ValueError(
                f"the GPU of compute capability {cap[0]}.{cap[1]} is older than every arch "
                f"this nvcc compiles for ({', '.join(f'{a}.{b}' for a, b in sorted(supported))}); "
                "set TORCH_CUDA_ARCH_LIST, or RNNFAST_SKIP_CUDA=1 for the CPU kernels only")
        archs.add(max(below))
        ptx.add(max(below))
    ptx.add(max(archs))
    return ";".join(f"{a}.{b}" + ("+PTX" if (a, b) in ptx else "") for a, b in sorted(archs))


# The CUDA backend: kernels (.cu, nvcc) and host code that only makes sense
# with them (.cpp, host compiler: cuBLAS calls, op registration).
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
cuda_sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
want_cuda = bool(cuda_sources) and not _flag("RNNFAST_SKIP_CUDA")
cuda_home = _find_cuda_home() if want_cuda else None
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402


def _check_torch_version():
    """Stops the build at once on a torch older than rnnfast supports
    (rnnfast/_torch_version.py, loaded by its path: the package itself
    needs the extension this builds)."""
    import importlib.util

    path = os.path.join(HERE, "rnnfast", "_torch_version.py")
    spec = importlib.util.spec_from_file_location("_rnnfast_torch_version", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.check_torch(torch.__version__)
    except ImportError as e:
        sys.exit(f"error: {e}")


_check_torch_version()

from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

with_cuda = want_cuda and torch.version.cuda is not None and cuda_home is not None
if want_cuda and not with_cuda:
    why = ("torch is a CPU-only build" if torch.version.cuda is None
           else "no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    if _flag("RNNFAST_FORCE_CUDA"):
        sys.exit(f"RNNFAST_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    warnings.warn(f"rnnfast: building the CPU kernels only: {why}")

cuda_archs = ""
if with_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
        if visible:
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            try:
                os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list_for_gpus(
                    caps, _nvcc_gpu_archs(cuda_home))
            except ValueError as e:
                sys.exit(f"error: rnnfast: {e}")
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    cuda_archs = os.environ["TORCH_CUDA_ARCH_LIST"]

cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cpu_sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
# cpu_backend.cpp, built without ISA flags, comes before the *_avx*.cpp and
# *_amx.cpp units (pointwise_avx2.cpp, int8_gemm_avx512.cpp, ...; each sets
# its ISA with #pragma GCC target) so that the linker keeps its copies of
# any inline function both emit.
cpu_sources.sort(key=lambda p: (any(s in os.path.basename(p) for s in ("_avx", "_amx")), p))

define_macros = [
    ("RNNFAST_TORCH_VERSION", f'"{torch.__version__}"'),
    ("RNNFAST_CUDA_ARCHS", f'"{cuda_archs}"'),
]
cxx_flags = ["-O3", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
# at::parallel_for is a header template: without OpenMP in rnnfast's own
# units (torch's libgomp, as torch's wheels use) it runs every loop on the
# calling thread, whatever torch.set_num_threads says.
omp_flags = ["-fopenmp"] if sys.platform.startswith("linux") else []
cxx_flags += omp_flags
include_dirs = [os.path.join(HERE, "csrc")]

if with_cuda:
    define_macros.append(("RNNFAST_WITH_CUDA", None))
    include_dirs += _nvidia_wheel_includes(cuda_home)
    # No --use_fast_math: it flushes subnormals to zero (--ftz=true), so tanhf
    # of a subnormal input would return 0 and the activations would lose the
    # accuracy promised at every value (tests/utils.py,
    # assert_activations_accurate). IEEE subnormals, division and square
    # root; the one fast intrinsic that is safe (__expf inside the sigmoid)
    # is chosen in lstm_cell.h, where the reason is written down.
    nvcc_flags = ["-O3", "--ftz=false", "--prec-div=true", "--prec-sqrt=true",
                  "--fmad=true", "-lineinfo", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    ext = CUDAExtension(
        "rnnfast._C",
        sources=cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=_cublas_link_args(cuda_home) + omp_flags,
    )
else:
    ext = CppExtension(
        "rnnfast._C",
        sources=cpu_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=omp_flags,
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
