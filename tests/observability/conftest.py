"""Fixtures of the observability suites: promtool, amtool, and real prometheus servers on free loopback ports.

Without the `prometheus`/`promtool` binaries (Debian's `prometheus` package) or the
`prometheus-alertmanager`/`amtool` ones (Debian's `prometheus-alertmanager`), both installed by
tests/system-deps.sh, the tests that need them skip with the reason, or fail under CI=true.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from obs_support import Prometheus, need_binary


@pytest.fixture(scope="session")
def promtool() -> str:
    return need_binary("promtool")


@pytest.fixture(scope="session")
def amtool() -> str:
    return need_binary("amtool")


@pytest.fixture(scope="module")
def prometheus_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """start(targets, rules_text) -> a started Prometheus; every one is stopped at module teardown."""
    started: list[Prometheus] = []

    def start(targets: list[str], rules_text: str) -> Prometheus:
        p = Prometheus(tmp_path_factory.mktemp("prometheus"), targets, rules_text)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()

