"""The environment switches of ring_flash_attn.agreement: bad values are clear errors, not silent defaults."""

import pytest

from ring_flash_attn import agreement


@pytest.mark.parametrize("value", ["sometimes", "ONCE"])
def test_unknown_mode_is_an_error(monkeypatch, value):
    monkeypatch.setenv(agreement.MODE_ENV, value)
    with pytest.raises(ValueError, match=rf"^RING_FLASH_ATTN_AGREE: expected one of \('once', 'always', 'never'\), got '{value}'"):
        agreement.mode()


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_bad_timeout_is_an_error(monkeypatch, value):
    monkeypatch.setenv(agreement.TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match="^RING_FLASH_ATTN_WAIT_TIMEOUT_S: expected a number of seconds"):
        agreement.wait_timeout()


def test_defaults(monkeypatch):
    monkeypatch.delenv(agreement.MODE_ENV, raising=False)
    monkeypatch.delenv(agreement.TIMEOUT_ENV, raising=False)
    assert agreement.mode() == "once" and agreement.wait_timeout().total_seconds() == agreement.DEFAULT_TIMEOUT_S
