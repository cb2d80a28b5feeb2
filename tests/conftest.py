"""Shared fixtures for the unit suites. Keep this small: each fixture says what it is for."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import RedisServer, need_redis

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Compile ingestd (and the torture suite's I/O shim) to bytecode once, before any test starts a process.

    The suite starts thousands of Python processes that import ingestd: daemons, their spawned workers, nodes,
    `ingestd` commands. An installed ingestd has its bytecode (pip compiles at install), but this checkout is an
    editable install, and under PYTHONDONTWRITEBYTECODE=1 (set on this machine kind, CI included) no process ever
    writes its __pycache__: each one compiled every module from source, ~0.1 s of its start-up. Written here
    once into ingestd/__pycache__ (ignored by git), as bench/engine.py does; a module changed since is compiled
    in memory again by its mtime, so nothing stale is ever run. What runs is the same code."""
    import compileall

    for folder in (ROOT / "ingestd", ROOT / "tests" / "torture" / "shim"):
        compileall.compile_dir(str(folder), quiet=1)


def _need_root(what: str) -> None:
    """Skip (with a reason) when not root; on CI (CI=true) a missing privilege is a failure, not a skip."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} needs root, and CI=true: the test must run there")
    pytest.skip(f"{what} needs root (mount); run as root or with CI=true")


@pytest.fixture
def tmpfs() -> Iterator[Callable[..., Path]]:
    """mount(path, size="1m") mounts a real tmpfs at path (created if missing); all are unmounted at teardown.

    For real kernel errors instead of mocks: a second filesystem (EXDEV, st_dev checks) or a tiny
    one (ENOSPC). Skips when not root, except under CI=true where it fails.
    """
    _need_root("a tmpfs mount")
    mounted: list[Path] = []

    def mount(path: Path, size: str = "1m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh ramfs mount (no size, no user xattrs, no birth times), unmounted after the test; root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting ramfs needs root")
    root = tmp_path / "ramfs"
    root.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(root)], check=True)
    yield root
    subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started RedisServer for the test (distributed mode), killed at teardown."""
    need_redis()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()
