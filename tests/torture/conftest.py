"""Torture suite fixtures. Scale with INGESTD_TORTURE_SCALE (default 1; `make torture-long` sets 10)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a torture test that takes tens of seconds (runs by default)")
