"""What the built extension registers: every rnnfast op has a CPU kernel, a
fake (Meta) kernel, and, in a CUDA build, a CUDA kernel. The ops are
enumerated from the dispatcher, so ops added later are covered. In a CUDA
build, what its GPU code holds, read from the binary without a GPU: machine
code for each arch it claims, and kernels that keep to their registers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import rnnfast
from utils import claimed_archs, cuda_tool

KNOWN_OPS = {"rnnfast::lstm_forward", "rnnfast::lstm_backward",
             "rnnfast::layer_norm_lstm_forward", "rnnfast::layer_norm_lstm_backward",
             "rnnfast::stacked_inference"}
# The int8 inference ops (rnnfast.quantized) are CPU kernels by design, and
# the CPU's mask generator (CUDA draws its masks with torch.randint).
CPU_ONLY_OPS = {"rnnfast::quantized_pack_weight", "rnnfast::quantized_lstm_forward",
                "rnnfast::quantized_layer_norm_lstm_forward", "rnnfast::quantized_lstm_stack",
                "rnnfast::quantized_layer_norm_lstm_stack", "rnnfast::quantized_linear",
                "rnnfast::bernoulli_masks"}


def _rnnfast_ops() -> list[str]:
    return sorted(name for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("rnnfast::"))


def _has_kernel(op: str, key: str) -> bool:
    """A kernel for ``key``, or one kernel for every device
    (CompositeExplicitAutograd: rnnfast::stacked_inference, which calls the
    layer ops, themselves dispatched by device)."""
    return (torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
            or torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd"))


def test_ops_are_registered():
    ops = _rnnfast_ops()
    assert KNOWN_OPS <= set(ops), ops
    for name in ops:  # reachable from Python as torch.ops.rnnfast.<op>
        assert hasattr(torch.ops.rnnfast, name.split("::", 1)[1]), name


@pytest.mark.parametrize("key", ["CPU", "Meta"])
def test_every_op_has_a_kernel_for(key):
    missing = [op for op in _rnnfast_ops() if not _has_kernel(op, key)]
    assert not missing, f"ops without a {key} kernel: {missing}"


def test_cuda_build_registers_every_op_for_cuda():
    if not rnnfast.build_info()["with_cuda"]:
        pytest.skip("rnnfast was built without CUDA (build_info()['with_cuda'] is False)")
    assert CPU_ONLY_OPS <= set(_rnnfast_ops())
    missing = [op for op in _rnnfast_ops() if op not in CPU_ONLY_OPS
               and not _has_kernel(op, "CUDA")]
    assert not missing, f"a CUDA build without CUDA kernels for: {missing}"


def test_no_cuda_kernels_claimed_without_cuda():
    """build_info must not say with_cuda=False while CUDA kernels exist
    (or the reverse, covered above)."""
    if rnnfast.build_info()["with_cuda"]:
        pytest.skip("CUDA build")
    registered = [op for op in _rnnfast_ops()
                  if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert not registered, registered


@pytest.mark.parametrize("op", ["rnnfast::lstm_forward", "rnnfast::layer_norm_lstm_forward"])
def test_forward_op_has_autograd(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd")


# ---- the GPU code in a CUDA build, read with cuobjdump ------------------------

CUDA_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cuda"


@pytest.fixture(scope="module")
def cuobjdump():
    if not rnnfast.build_info()["with_cuda"]:
        pytest.skip("rnnfast was built without CUDA")
    tool = cuda_tool("cuobjdump")
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton)")

    def run(*args: str) -> str:
        return subprocess.run([tool, *args, rnnfast._C.__file__], check=True,
                              capture_output=True, text=True).stdout
    return run


def test_claimed_archs_parse():
    assert claimed_archs("7.5;8.0;9.0+PTX") == ({"75", "80", "90"}, {"90"})
    assert claimed_archs("9.0a") == ({"90a"}, set())


def _setup_functions(*names):
    """Functions of setup.py, run from its source (importing setup.py would
    build): only the named definitions, with the modules they use."""
    import ast
    import os

    source = (CUDA_SOURCES.parent.parent / "setup.py").read_text()
    tree = ast.parse(source)
    defs = [node for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name in names]
    assert {d.name for d in defs} == set(names), names
    scope = {"os": os, "re": re, "subprocess": subprocess}
    exec(compile(ast.Module(body=defs, type_ignores=[]), "setup.py", "exec"), scope)
    return [scope[name] for name in names]


def test_arch_list_for_visible_gpus():
    """setup.py's default for a build on a GPU machine: the GPUs' archs and
    the newest one's PTX; a GPU newer than nvcc gets the newest arch nvcc
    knows below it as PTX (asking nvcc for an arch it does not know stops
    the build); one older than all of them is a clear error."""
    parse, arch_list = _setup_functions("_parse_gpu_archs", "_arch_list_for_gpus")
    # `nvcc --list-gpu-arch` of CUDA 13.0 and of CUDA 12.6
    cuda13 = parse("compute_75\ncompute_80\ncompute_86\ncompute_87\ncompute_88\n"
                   "compute_89\ncompute_90\ncompute_100\ncompute_110\ncompute_103\n"
                   "compute_120\ncompute_121\n")
    assert (12, 0) in cuda13 and (10, 3) in cuda13 and (7, 5) == min(cuda13)
    cuda126 = parse("compute_50 compute_52 compute_53 compute_60 compute_61 compute_62 "
                    "compute_70 compute_72 compute_75 compute_80 compute_86 compute_87 "
                    "compute_89 compute_90 compute_90a")
    assert max(cuda126) == (9, 0) and (9, 0) in cuda126 and len(cuda126) == 14

    assert arch_list({(9, 0)}, cuda13) == "9.0+PTX"
    assert arch_list({(8, 6), (9, 0)}, cuda13) == "8.6;9.0+PTX"
    assert arch_list({(12, 0)}, cuda13) == "12.0+PTX"
    assert arch_list({(9, 0)}, None) == "9.0+PTX"  # nvcc could not say
    # an RTX 50 (12.0) and a B200 (10.0) with CUDA 12.6: Hopper's PTX
    assert arch_list({(12, 0)}, cuda126) == "9.0+PTX"
    assert arch_list({(8, 0), (10, 0)}, cuda126) == "8.0;9.0+PTX"
    # a GPU between two known archs: the one below, as PTX too
    assert arch_list({(8, 8), (9, 0)}, cuda126) == "8.7+PTX;9.0+PTX"
    with pytest.raises(ValueError, match=r"compute capability 7\.0 is older than every arch"):
        arch_list({(7, 0)}, cuda13)


def test_gpu_code_for_every_claimed_arch(cuobjdump):
    """Every CUDA source is in the binary as machine code for each arch that
    build_info()['cuda_archs'] names, and as PTX for each one marked +PTX
    (which the driver compiles for newer GPUs), and nothing else."""
    sass, ptx = claimed_archs(rnnfast.build_info()["cuda_archs"])
    found: dict[str, dict[str, set[str]]] = {"elf": {}, "ptx": {}}
    for kind in ("elf", "ptx"):
        for line in cuobjdump(f"--list-{kind}").splitlines():
            m = re.search(r"(\w+)\.sm_(\w+)\.(cubin|ptx)$", line.strip())
            if m:
                found[kind].setdefault(m.group(1), set()).add(m.group(2))
    sources = {p.stem for p in CUDA_SOURCES.glob("*.cu")}
    assert set(found["elf"]) == sources, found["elf"]
    for source in sources:
        assert found["elf"][source] == sass, (source, found["elf"][source], sass)
        assert found["ptx"].get(source, set()) == ptx, (source, found["ptx"].get(source), ptx)


def test_kernels_do_not_spill(cuobjdump):
    """No kernel of a float, half or bfloat16 type keeps values in local
    memory (a register spill, or an array the compiler could not keep in
    registers): each kernel's registers are capped by its __launch_bounds__,
    and a spill in the step kernels would cost every step a round trip to
    memory. float64 (for gradcheck, not speed) may spill. Static shared
    memory stays within the 48 KiB a kernel gets without opting in."""
    demangle = shutil.which("c++filt")
    if demangle is None:
        pytest.skip("c++filt not found")
    text = cuobjdump("--dump-resource-usage")
    kernels = re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text)
    assert kernels, text[:2000]
    names = subprocess.run([demangle], input="\n".join(k for k, _ in kernels),
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(names) == len(kernels)
    spills, too_big = [], []
    for name, (_, usage) in zip(names, kernels):
        res = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", usage)}
        if (res["STACK"] or res["LOCAL"]) and "double" not in name:
            spills.append(f"{name}: {usage}")
        if res["SHARED"] > 48 * 1024 or res["REG"] > 255:
            too_big.append(f"{name}: {usage}")
    assert not spills, "\n".join(spills)
    assert not too_big, "\n".join(too_big)
