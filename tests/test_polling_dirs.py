"""Test 6 of issue 11, folders: tests/test_directories.py's end-to-end tests (folders left alone, recursive mode,
cp -r, kill -9) run again with the polling watcher alone (INGESTD_WATCH=polling). See tests/test_polling.py."""

from __future__ import annotations

import pytest
from test_directories import *  # every folder test of the daemon (and its `start` fixture), again under polling


@pytest.fixture(autouse=True)
def polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTD_WATCH", "polling")
    monkeypatch.setenv("INGESTD_POLL_INTERVAL", "0.1")
