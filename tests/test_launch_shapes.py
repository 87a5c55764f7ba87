"""The CUDA kernels' launch shapes (csrc/cuda/launch.cuh), checked on the
host without a GPU: a small program built with nvcc calls rows_by_cols,
row_groups and flat over a sweep of rows, widths, SM counts and cluster
limits and checks what the kernels rely on (whole warps, at most
kMaxRowThreads threads and kMaxBlockWarps warps of row-sum slots per block,
a grid that is whole clusters, one row per block in a cluster, the 65535
blocks a grid-stride loop is written for, ...). Skipped where nvcc is not
found. Seconds: the program has no device code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from utils import cuda_tool

CSRC = Path(__file__).resolve().parent.parent / "csrc"

PROGRAM = r"""
#include "cuda/launch.cuh"

#include <cstdio>

using namespace rnnfast::cuda;

#define EXPECT(cond)                                                        \
  if (!(cond)) {                                                            \
    std::printf("FAILED %s at rows=%lld n=%lld sms=%d max_cluster=%d\n",   \
                #cond, (long long)rows, (long long)n, sms, max_cluster);    \
    return 1;                                                               \
  }

int main() {
  long long checked = 0;
  const int64_t many = 600000;  // more rows than one grid covers
  for (int sms : {1, 108, 132}) {
    for (int max_cluster : {1, 4}) {
      for (int64_t rows : {int64_t(1), int64_t(3), int64_t(8), int64_t(33), int64_t(64),
                           int64_t(65), int64_t(66), int64_t(131), int64_t(132),
                           int64_t(150), int64_t(1000), many}) {
        for (int64_t n = 1; n <= 4200; n += n < 130 ? 1 : 61) {
          // LayerNorm rows: row_groups
          const LaunchShape l = row_groups(rows, n, sms, max_cluster);
          const int64_t bx = l.block.x, by = l.block.y, c = l.cluster;
          EXPECT(bx >= 32 && bx % 32 == 0);                  // whole warps
          EXPECT(bx * by <= kMaxRowThreads);                 // __launch_bounds__
          EXPECT(bx / 32 * by <= kMaxRowThreads / 32);       // row_sum's slots
          EXPECT(l.block.z == 1 && l.grid.y == 1 && l.grid.z == 1);
          EXPECT(c >= 1 && c <= max_cluster && (c & (c - 1)) == 0);
          EXPECT(l.grid.x % c == 0);                         // whole clusters
          EXPECT(l.grid.x <= kMaxBlocks);
          EXPECT(c == 1 || by == 1);                         // s.block[threadIdx.y]
          EXPECT(c == 1 || bx >= kMinClusterThreads);
          EXPECT(c == 1 || rows * (c / 2) < sms);            // only while short of SMs
          const int64_t groups = l.grid.x / c;
          EXPECT(groups >= 1 && groups <= (rows + by - 1) / by);
          EXPECT(groups * by >= rows || groups == kMaxBlocks / c);  // else loops
          EXPECT(bx <= (n + 31) / 32 * 32 || bx == 32);      // no idle warps
          // LSTM elements: rows_by_cols
          const LaunchShape e = rows_by_cols(rows, n);
          EXPECT(e.block.x % 32 == 0 && e.block.x * e.block.y <= kBlockThreads);
          EXPECT(int64_t(e.block.x) * e.grid.x >= n);        // every column
          EXPECT(e.grid.y >= 1 && e.grid.y <= kMaxBlocks);
          EXPECT(int64_t(e.grid.y) * e.block.y >= rows || e.grid.y == kMaxBlocks);
          // flat elementwise ranges
          const LaunchShape f = flat(rows * n);
          EXPECT(f.block.x == kBlockThreads && f.grid.x >= 1 && f.grid.x <= kMaxBlocks);
          EXPECT(int64_t(f.grid.x) * kBlockThreads >= rows * n || f.grid.x == kMaxBlocks);
          ++checked;
        }
      }
    }
  }
  std::printf("ok %lld\n", checked);
  return 0;
}
"""


def test_launch_shapes_fit_what_the_kernels_assume(tmp_path):
    nvcc = cuda_tool("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    if torch.version.cuda is None:  # e.g. make test TORCH_SPEC=torch==2.13.0
        pytest.skip("a CPU-only torch ships no c10/cuda headers")
    torch_dir = Path(torch.__file__).resolve().parent
    (tmp_path / "shapes.cu").write_text(PROGRAM)
    exe = tmp_path / "shapes"
    build = subprocess.run(
        [nvcc, "-std=c++20", "-O1", f"-I{CSRC}", f"-I{torch_dir / 'include'}",
         f"-L{torch_dir / 'lib'}", "-lc10", "-Xlinker", f"-rpath={torch_dir / 'lib'}",
         str(tmp_path / "shapes.cu"), "-o", str(exe)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout + run.stderr
    assert int(run.stdout.split()[1]) > 10000
