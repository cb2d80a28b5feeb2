"""Fixtures of the distributed tests: `rig(...)` builds a cluster (rig.Rig) that is torn down after the test,
whatever happened (process groups killed, namespaces and veths deleted). See rig.py and DISTRIBUTED.md §7."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .rig import Rig


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(**kw: Any) -> Rig:
        r = Rig(tmp_path / f"rig{len(made)}", **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
