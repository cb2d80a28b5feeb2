"""Shared fixtures for the unit suites. Keep this small: each fixture says what it is for."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


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


class RedisServer:
    """A real redis-server on a free loopback port, its data (AOF) in `dir`; kill() and start() again on the same
    port and data, as a Redis restart. url: redis://127.0.0.1:PORT/0."""

    def __init__(self, dir: Path) -> None:
        import socket

        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import time

        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
             "--protected-mode", "no", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.5).ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: see {self.dir / 'redis.log'}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def need_redis() -> None:
    """Skip (with a reason) without redis-server or the distributed extra; under CI=true that is a failure."""
    import importlib.util
    import shutil

    missing = [what for what, ok in (("redis-server", shutil.which("redis-server")),
                                     ("dramatiq (pip install -e '.[distributed]')", importlib.util.find_spec("dramatiq")))
               if not ok]
    if not missing:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"missing {', '.join(missing)}, and CI=true: the distributed tests must run there")
    pytest.skip(f"missing {', '.join(missing)} (tests/system-deps.sh installs redis-server as root)")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started RedisServer for the test (distributed mode), killed at teardown."""
    need_redis()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()
