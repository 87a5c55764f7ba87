"""The CPU pointwise kernels are built for several SIMD levels and picked at
run time (honouring ATEN_CPU_CAPABILITY): every level computes the same
thing. Also rnnfast.build_info() and ``python -m rnnfast``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rnnfast
from utils import assert_activations_accurate, randomize_layer_norm_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Forward + backward of small models (rnnfast.LSTM in float64 and float32,
# rnnfast.LayerNormLSTM in float64), from weights and inputs made by the
# parent process (torch's own random generators differ across SIMD levels in
# the last bits), saved to argv[2]. H = 5 and proj 3 are not multiples of any
# vector width, so the tail paths run too.
SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import rnnfast
    from torch.nn.utils.rnn import pack_padded_sequence

    def run(cases):
        res = {"cpu_kernels": rnnfast.build_info()["cpu_kernels"],
               "aten_capability": torch.backends.cpu.get_cpu_capability()}
        from utils import activation_probe
        for dtype in (torch.float32, torch.float64):
            res[f"activations-{dtype}"] = activation_probe(dtype)
        for key, case in cases.items():
            if case.get("layer_norm"):
                m = rnnfast.LayerNormLSTM(4, 5, num_layers=2, bidirectional=True,
                                          eps=case["eps"]).to(case["x"].dtype)
            else:
                m = rnnfast.LSTM(4, 5, num_layers=2, bidirectional=True,
                                 proj_size=case["proj"]).to(case["x"].dtype)
            m.load_state_dict(case["state"])
            x = case["x"].clone().requires_grad_()
            inp = pack_padded_sequence(x, torch.tensor([6, 2, 4]),
                                       enforce_sorted=False) if case["packed"] else x
            out, (h, c) = m(inp)
            out = out.data if case["packed"] else out
            (out.sin().sum() + 2 * h.sum() + 3 * c.sum()).backward()
            res[key + "-out"] = out.detach()
            res[key + "-h"] = h.detach()
            res[key + "-c"] = c.detach()
            res[key + "-grad_x"] = x.grad
            for n, p in m.named_parameters():
                res[key + "-grad." + n] = p.grad
        return res

    if __name__ == "__main__":
        sys.path.insert(0, sys.argv[3])  # the tests folder, for utils
        torch.save(run(torch.load(sys.argv[1])), sys.argv[2])
""")


def _make_cases() -> dict:
    g = torch.Generator().manual_seed(0)
    cases = {}
    for dtype in (torch.float64, torch.float32):
        for proj, packed in ((0, False), (3, True)):
            torch.manual_seed(1)
            m = rnnfast.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=proj).to(dtype)
            cases[f"{dtype}-proj{proj}-packed{packed}"] = dict(
                proj=proj, packed=packed, state=m.state_dict(),
                x=torch.randn(6, 3, 4, generator=g, dtype=torch.float64).to(dtype))
    # The LayerNorm-LSTM, with LayerNorm gains and biases away from 1 and 0
    # and a non-default eps once.
    for packed, eps in ((False, 1e-5), (True, 1e-3)):
        torch.manual_seed(2)
        m = randomize_layer_norm_(rnnfast.LayerNormLSTM(4, 5, num_layers=2,
                                                        bidirectional=True).double())
        cases[f"{torch.float64}-layernorm-packed{packed}"] = dict(
            layer_norm=True, eps=eps, packed=packed, state=m.state_dict(),
            x=torch.randn(6, 3, 4, generator=g, dtype=torch.float64))
    return cases


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("simd") / "cases.pt"
    torch.save(_make_cases(), path)
    return path


def _run_in_subprocess(tmp_path, cases_file, capability=None) -> dict:
    script = tmp_path / "simd_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"result-{capability}.pt"
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    # This checkout's rnnfast, not whichever an editable install points at
    # (a script's sys.path starts at its own folder, not at cwd).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    tests_dir = os.path.join(REPO, "tests")
    proc = subprocess.run([sys.executable, str(script), str(cases_file), str(out), tests_dir],
                          env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def _capabilities_of_this_cpu():
    """ATen's capability here; AVX2 is only testable where the CPU has it."""
    return torch.backends.cpu.get_cpu_capability()


def test_build_info_reports_the_capability_in_use():
    info = rnnfast.build_info()
    assert info["cpu_kernels"] in ("DEFAULT", "AVX2", "AVX512")
    expected = _capabilities_of_this_cpu()
    if os.environ.get("ATEN_CPU_CAPABILITY") is None and expected in ("DEFAULT", "AVX2",
                                                                       "AVX512"):
        assert info["cpu_kernels"] == expected


@pytest.fixture(scope="module")
def native_results(tmp_path_factory, cases_file):
    """The same script in a process with no ATEN_CPU_CAPABILITY set (the
    best kernels of this CPU)."""
    return _run_in_subprocess(tmp_path_factory.mktemp("native"), cases_file)


@pytest.mark.parametrize("capability,name", [("default", "DEFAULT"), ("avx2", "AVX2")])
def test_simd_levels_agree(tmp_path, cases_file, native_results, capability, name):
    if name == "AVX2" and _capabilities_of_this_cpu() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    res = _run_in_subprocess(tmp_path, cases_file, capability)
    assert res.pop("cpu_kernels") == name
    # ATen's name of its portable level: "DEFAULT" ("NO AVX" in torch 2.8)
    assert res.pop("aten_capability") in ({name, "NO AVX"} if name == "DEFAULT" else {name})
    for dtype in (torch.float32, torch.float64):
        assert_activations_accurate(*res.pop(f"activations-{dtype}"))
    assert native_results["cpu_kernels"] == native_results["aten_capability"]
    native = {k: v for k, v in native_results.items() if isinstance(v, torch.Tensor)}
    for dtype in (torch.float32, torch.float64):
        assert_activations_accurate(*native_results[f"activations-{dtype}"])
    assert set(res) == set(native)
    # The LayerNorm-LSTM op is compared too, every LayerNorm gradient included.
    for packed in (False, True):
        prefix = f"{torch.float64}-layernorm-packed{packed}-"
        assert {prefix + "out", prefix + "grad_x", prefix + "grad.ln_ih_weight_l1_reverse",
                prefix + "grad.ln_cell_bias_l0"} <= set(native)
    for key, expected in native.items():
        tol = dict(atol=1e-12, rtol=1e-12) if "float64" in key else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res[key], expected, **tol, msg=lambda m, k=key: f"{k}: {m}")


def test_native_process_matches_this_process(tmp_path, cases_file, native_results):
    """The subprocess computes what this process computes (so the
    comparison above is against the kernels the other tests exercise).
    Where this process runs under a forced ATEN_CPU_CAPABILITY (emulating
    an older CPU), the subprocess is given the same one."""
    namespace: dict = {}
    exec(compile(SCRIPT, "simd_run.py", "exec"), namespace)
    here = namespace["run"](torch.load(cases_file))
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    there = (native_results if forced is None
             else _run_in_subprocess(tmp_path, cases_file, forced))
    assert here["cpu_kernels"] == there["cpu_kernels"]
    for key, value in there.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(here[key], value, atol=0, rtol=0,
                                       msg=lambda m, k=key: f"{k}: {m}")


# --------------------------------------------------------------------------
# build_info and python -m rnnfast
# --------------------------------------------------------------------------
def test_build_info_keys_and_types():
    info = rnnfast.build_info()
    assert isinstance(info, dict)
    for key in ("with_cuda", "cuda_archs", "torch_version", "cpu_kernels", "cpu_gemm"):
        assert key in info, key
    assert isinstance(info["with_cuda"], bool)
    assert isinstance(info["cuda_archs"], str)
    assert isinstance(info["torch_version"], str) and info["torch_version"]
    if info["with_cuda"]:
        assert info["cuda_archs"], "a CUDA build names the architectures it was built for"
    assert info["rnnfast_version"] == rnnfast.__version__
    # An extension only loads into the torch it was built against.
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


def test_python_m_rnnfast_prints_build_info():
    proc = subprocess.run([sys.executable, "-m", "rnnfast"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.strip().partition(" ")
        lines[key] = value  # cuda_archs may be empty
    info = rnnfast.build_info()
    for key in ("with_cuda", "cuda_archs", "torch_version", "cpu_kernels"):
        assert key in lines, proc.stdout
        assert lines[key].strip() == str(info[key]).strip(), key
    assert lines["torch_version_running"].strip() == torch.__version__
