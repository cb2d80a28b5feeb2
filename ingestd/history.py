"""Recent completions kept across restarts: .ingestd/recent.json in the watch dir, newest first.

Best effort by design: the history is for people (the page, `ingestd status`), never for the queue's
correctness, so a failed save is logged and a missing or damaged file reads as no history.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ingestd import durable
from ingestd.names import STATE_DIR, TEMP_PREFIX

FILE = "recent.json"


def path(root: str) -> str:
    return os.path.join(root, STATE_DIR, FILE)


def load(root: str) -> list[dict[str, Any]]:
    """The saved completions, newest first ([] if none or unreadable)."""
    try:
        records = json.loads(durable.read_small(path(root)))
    except (OSError, ValueError):
        return []
    if not isinstance(records, list):
        return []
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("seq"), int)]


def save(root: str, records: list[dict[str, Any]]) -> None:
    """Replace the saved completions atomically (readers see the old list or the new one). Raises OSError."""
    durable.publish_bytes(os.path.join(root, STATE_DIR), FILE, json.dumps(records, ensure_ascii=True).encode(),
                          TEMP_PREFIX + "tmp-" + FILE)
