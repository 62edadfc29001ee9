"""Backend choice and launcher detection, including the XPU branches, without any accelerator."""

import sys
import types

import pytest

from ring_flash_attn.comm import backend as backend_mod
from ring_flash_attn.comm.backend import choose_backend
from ring_flash_attn.comm.launch import detect_launch


def test_cpu_and_cuda(monkeypatch):
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    assert choose_backend("cpu") == "gloo"
    assert choose_backend("cuda") == "nccl"


def test_xpu_prefers_xccl(monkeypatch):
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(backend_mod.dist, "is_xccl_available", lambda: True, raising=False)
    assert choose_backend("xpu") == "xccl"


def test_xpu_falls_back_to_oneccl_bindings(monkeypatch):
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(backend_mod.dist, "is_xccl_available", lambda: False, raising=False)
    monkeypatch.setitem(sys.modules, "oneccl_bindings_for_pytorch", types.ModuleType("oneccl_bindings_for_pytorch"))
    assert choose_backend("xpu") == "ccl"


def test_xpu_without_any_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(backend_mod.dist, "is_xccl_available", lambda: False, raising=False)
    monkeypatch.setitem(sys.modules, "oneccl_bindings_for_pytorch", None)  # import raises ImportError
    with pytest.raises(RuntimeError, match="no collective backend"):
        choose_backend("xpu")


def test_override_by_argument_and_environment(monkeypatch):
    assert choose_backend("cuda", override="gloo") == "gloo"
    monkeypatch.setenv(backend_mod.ENV_VAR, "mpi")
    assert choose_backend("xpu") == "mpi"


def test_unknown_device(monkeypatch):
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="device"):
        choose_backend("tpu")


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1, "torchrun")),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, (5, 6, 2, "openmpi")),
    ({"PMIX_RANK": "7", "PMI_SIZE": "12", "PALS_LOCAL_RANKID": "3"}, (7, 12, 3, "pmix")),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "PALS_LOCAL_RANKID": "0"}, (2, 4, 0, "pmi")),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1"}, (2, 4, 1, "pmi")),
    ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, (9, 16, 1, "slurm")),
    ({}, (0, 1, 0, "none")),
])
def test_detect_launch(env, expected):
    info = detect_launch(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == expected


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1"}, "WORLD_SIZE"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "outside world size"),
    ({"PMI_RANK": "x", "PMI_SIZE": "2"}, "expected an integer"),
])
def test_detect_launch_bad_environment(env, message):
    with pytest.raises(ValueError, match=message):
        detect_launch(env)
