"""MEGAFLEET_CONNECT_TIMEOUT: the job commands' SSH connect timeout, checked by name."""

import pytest

from megafleet.errors import UsageError
from megafleet.ssh.connection import ConnectionPool, default_connect_timeout


def test_unset_is_ten_seconds_and_a_number_is_taken(monkeypatch):
    monkeypatch.delenv("MEGAFLEET_CONNECT_TIMEOUT", raising=False)
    assert default_connect_timeout() == 10.0 == ConnectionPool().connect_timeout
    monkeypatch.setenv("MEGAFLEET_CONNECT_TIMEOUT", "2.5")
    assert ConnectionPool().connect_timeout == 2.5
    assert ConnectionPool(connect_timeout=7).connect_timeout == 7  # an explicit value wins


@pytest.mark.parametrize("raw", ["soon", "0", "-3", "nan", "inf"])
def test_a_bad_value_is_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv("MEGAFLEET_CONNECT_TIMEOUT", raw)
    with pytest.raises(UsageError) as e:
        ConnectionPool()
    assert f"MEGAFLEET_CONNECT_TIMEOUT={raw!r}" in e.value.message and "unset it" in e.value.hint
