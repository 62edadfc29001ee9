"""A missing SYCL toolchain fails the tests under CI and skips them, with the reason, elsewhere."""

from __future__ import annotations

import pytest

from . import acpp_build


def test_missing_toolchain_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("RFA_ACPP_PREFIX", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=f"required under CI.*no AdaptiveCpp compiler at {tmp_path}"):
        acpp_build.acpp_prefix()


def test_missing_toolchain_skips_with_reason_outside_ci(monkeypatch, tmp_path):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("RFA_ACPP_PREFIX", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match=f"no AdaptiveCpp compiler at {tmp_path}"):
        acpp_build.acpp_prefix()
