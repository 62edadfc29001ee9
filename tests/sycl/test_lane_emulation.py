"""The kernels' lane logic at the Intel sub-group size (16), emulated on the host.

The CPU build of the kernels has one lane per sub-group, so its shuffles and
broadcasts exchange nothing. tests/sycl/lane_emulation.cpp runs the same functions
of csrc/sycl/lane_logic.hpp with 16 threads as lanes; here we feed it one
(batch, head) problem and check every result against the float64 reference.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ring_flash_attn.kernels.mask import Band
from ring_flash_attn.kernels.reference import ReferenceBackend
from ring_flash_attn.merge import merge_into
from tests.tolerances import FORWARD, GRADIENT, rel_err

from .acpp_build import missing_toolchain

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "lane_emulation.cpp", HERE.parents[1] / "csrc" / "sycl" / "lane_logic.hpp"]
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ring_flash_attn"

CASES = {
    "causal_offsets_rows_without_keys": (40, 70, dict(causal=True, q_offset=0, k_offset=12)),
    "window": (37, 70, dict(window=(20, 5), q_offset=30)),
    "softcap_full": (33, 45, dict(softcap=5.0)),
}


@pytest.fixture(scope="module")
def emulator() -> Path:
    compiler = os.environ.get("RFA_HOST_CXX") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        missing_toolchain("no host C++ compiler (g++ or clang++) for the lane emulation")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + compiler.encode()).hexdigest()[:16]
    binary = CACHE_ROOT / f"lane_emulation-{digest}"
    if not binary.exists():
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        subprocess.run([compiler, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas",
                        f"-I{SOURCES[1].parent}", str(SOURCES[0]), "-o", str(partial)], check=True)
        partial.replace(binary)
    return binary


def run_emulator(binary: Path, tmp_path: Path, q, k, v, dout, lse, delta, out_acc, lse_acc, band: Band, scale,
                 softcap):
    seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[0]
    header = np.array([head_dim, seqlen_q, seqlen_k, band.offset, band.lo is not None, band.lo or 0,
                       band.hi is not None, band.hi or 0], dtype=np.int64).tobytes()
    header += np.array([scale, softcap], dtype=np.float32).tobytes()
    arrays = b"".join(x.float().contiguous().numpy().tobytes() for x in (q, k, v, dout, lse, delta, out_acc, lse_acc))
    (tmp_path / "in.bin").write_bytes(header + arrays)
    subprocess.run([str(binary), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True, timeout=120)
    flat = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32))
    sizes = [seqlen_q * head_dim, seqlen_q, seqlen_q * head_dim, seqlen_q, seqlen_q * head_dim,
             seqlen_k * head_dim, seqlen_k * head_dim]
    assert flat.numel() == sum(sizes)
    out, lse_out, merged_out, merged_lse, dq, dk, dv = flat.split(sizes)
    return (out.view(seqlen_q, head_dim), lse_out, merged_out.view(seqlen_q, head_dim), merged_lse,
            dq.view(seqlen_q, head_dim), dk.view(seqlen_k, head_dim), dv.view(seqlen_k, head_dim))


def assert_matches(name, actual, expected, tolerance):
    error = rel_err(actual, expected)  # inf if a -inf (row without keys) is not reproduced exactly
    assert error <= tolerance, f"{name}: relative error {error:.3e} exceeds {tolerance:.1e}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sixteen_lanes_match_reference(emulator, tmp_path, head_dim, case):
    torch.manual_seed(zlib.crc32(f"{case}-{head_dim}".encode()))
    seqlen_q, seqlen_k, mask = CASES[case]
    scale = 1.0 / math.sqrt(head_dim)
    q, dout = torch.randn(2, seqlen_q, head_dim, dtype=torch.float64).unbind(0)
    k, v = torch.randn(2, seqlen_k, head_dim, dtype=torch.float64).unbind(0)
    as_bshd = lambda x: x[None, :, None, :]  # noqa: E731  [S, D] -> [1, S, 1, D]
    reference = ReferenceBackend()
    ref_out, ref_lse = reference.forward(as_bshd(q), as_bshd(k), as_bshd(v), scale=scale, **mask)
    ref_grads = reference.backward(as_bshd(dout), as_bshd(q), as_bshd(k), as_bshd(v), ref_out, ref_lse, scale=scale,
                                   **mask)
    delta = (dout * ref_out[0, :, 0]).sum(-1)
    # A running accumulator from other keys, with some rows that have seen nothing yet.
    out_acc = torch.randn(seqlen_q, head_dim, dtype=torch.float64)
    lse_acc = torch.randn(seqlen_q, dtype=torch.float64)
    out_acc[::3], lse_acc[::3] = 0.0, float("-inf")
    ref_out_acc, ref_lse_acc = as_bshd(out_acc.clone()), lse_acc.clone()[None, None]
    merge_into(ref_out_acc, ref_lse_acc, ref_out, ref_lse)

    band = Band.from_kernel_args(mask.get("causal", False), mask.get("window", (-1, -1)), mask.get("q_offset", 0),
                                 mask.get("k_offset", 0))
    out, lse, merged_out, merged_lse, dq, dk, dv = run_emulator(
        emulator, tmp_path, q, k, v, dout, ref_lse[0, 0], delta, out_acc, lse_acc, band, scale,
        mask.get("softcap", 0.0))
    # The emulation computes in float32 throughout.
    assert_matches("out", out, ref_out[0, :, 0], FORWARD[torch.float32])
    assert_matches("lse", lse, ref_lse[0, 0], FORWARD[torch.float32])
    assert_matches("merged out", merged_out, ref_out_acc[0, :, 0], FORWARD[torch.float32])
    assert_matches("merged lse", merged_lse, ref_lse_acc[0, 0], FORWARD[torch.float32])
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        assert_matches(name, grad, ref_grad[0, :, 0], GRADIENT[torch.float32])
