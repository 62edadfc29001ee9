"""``ring-attn env``: what this process would run on, for bug reports and for checking a launch script.

Collects the device, the collective backend that would be chosen, library versions, the rank layout the
launcher announced, and the environment variables that steer oneCCL, Level Zero, libfabric, NCCL and the
launchers. It starts nothing: no process group, no device context beyond asking what is available.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
import sys
from typing import Dict, Optional

# Environment variables worth seeing when a multi-rank run misbehaves, by prefix.
ENV_PREFIXES = ("CCL_", "FI_", "ZE_", "ONEAPI_", "SYCL_", "UR_", "NEOReadDebugKeys", "MPICH_", "PALS_", "PMI_",
                "PMIX_", "I_MPI_", "NCCL_", "CUDA_VISIBLE_DEVICES", "TORCH_", "TORCHELASTIC_", "MASTER_ADDR",
                "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS",
                "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "OMPI_COMM_WORLD_",
                "MPI_LOCALRANKID", "RING_FLASH_ATTN_", "TRITON_")


def _version(distribution: str, module: Optional[str] = None) -> Optional[str]:
    """The installed version of ``distribution`` (or ``module.__version__``), None when absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module:
        try:
            return getattr(importlib.import_module(module), "__version__", "unknown")
        except ImportError:
            return None
    return None


# Distributions the package may use that its metadata cannot name: Intel's deprecated fallbacks (never required).
OPTIONAL_ELSEWHERE = ("pytorch-triton-xpu", "oneccl_bind_pt", "intel_extension_for_pytorch")


def _requirement_name(requirement: str) -> str:
    """``"triton==3.7.1; extra == 'test'"`` -> ``"triton"``."""
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]


def dependencies() -> list:
    """Every distribution ring_flash_attn requires or offers as an extra, from its installed metadata (the
    single list of them is setup.py), then the optional Intel packages."""
    try:
        requires = importlib.metadata.requires("ring-attention-xpu") or []
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that was never installed
        requires = []
    names = dict.fromkeys(["torch", *(_requirement_name(r) for r in requires), *OPTIONAL_ELSEWHERE])
    return list(names)


def _devices(torch) -> Dict[str, object]:
    found: Dict[str, object] = {}
    for kind in ("xpu", "cuda"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            count = backend.device_count()
            found[kind] = {"count": count, "names": [backend.get_device_name(i) for i in range(count)]}
    return found


def collect_env(environ: Optional[Dict[str, str]] = None) -> dict:
    """Everything ``ring-attn env`` reports, as plain data (JSON-serialisable)."""
    import torch
    import torch.distributed as dist

    from ..comm import choose_backend, default_device_type, detect_launch

    environ = dict(os.environ if environ is None else environ)
    device_type = default_device_type()
    try:
        backend = choose_backend(device_type)
    except (RuntimeError, ValueError) as exc:  # e.g. an XPU torch without XCCL: report it, do not fail
        backend = f"none ({exc})"
    try:
        launch = detect_launch(environ)
        ranks = {"launcher": launch.launcher, "rank": launch.rank, "world_size": launch.world_size,
                 "local_rank": launch.local_rank}
    except ValueError as exc:
        ranks = {"error": str(exc)}
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "device_type": device_type,
        "devices": _devices(torch),
        "dist_backend": backend,
        "xccl_available": bool(getattr(dist, "is_xccl_available", lambda: False)()),
        "versions": {"ring_flash_attn": _version("ring-attention-xpu", "ring_flash_attn"),
                     "torch": torch.__version__,
                     **{name: _version(name) for name in dependencies() if name != "torch"}},
        "ranks": ranks,
        "environment": {k: v for k, v in sorted(environ.items()) if k.startswith(ENV_PREFIXES)},
    }


def format_env(info: Optional[dict] = None) -> str:
    """``collect_env()`` as aligned text."""
    info = collect_env() if info is None else info
    lines = [f"python            {info['python']}  ({info['platform']}, host {info['hostname']})",
             f"device            {info['device_type']}"]
    for kind, found in info["devices"].items():
        lines.append(f"  {kind:<15} {found['count']} x {', '.join(sorted(set(found['names'])))}")
    lines.append(f"dist backend      {info['dist_backend']} (xccl available: {info['xccl_available']})")
    lines.append(f"ranks             {', '.join(f'{k}={v}' for k, v in info['ranks'].items())}")
    lines.append("versions")
    lines += [f"  {name:<31} {version or 'not installed'}" for name, version in info["versions"].items()]
    lines.append("environment" + ("" if info["environment"] else "       (none of the relevant variables set)"))
    lines += [f"  {key}={value}" for key, value in info["environment"].items()]
    return "\n".join(lines)
