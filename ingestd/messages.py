"""Typed messages between the parent and its workers, pickled over a multiprocessing pipe.

Parent -> worker: Assign(names), a batch, or Stop(). Worker -> parent: Ready once (or StartFailed, then it exits),
then for each batch any number of Heartbeat and one Outcomes: per file one of Done, Rejected or Retry (an
environmental error: the input is kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ingestd.sinks import Superseded  # made by a publish (file_exist), carried to the parent in Done


class Stage(StrEnum):
    READ = "read"  # reading the input and writing temp outputs
    COMMIT = "commit"  # fsyncing and publishing outputs: slow disks are progress too


@dataclass(frozen=True, slots=True)
class Assign:
    names: tuple[str, ...]  # claimed files, in underprocess/: processed in order, then committed as one group


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int
    marker_ok: bool = True  # it can keep its in-flight record (inflight.py); if not, recovery must count all


@dataclass(frozen=True, slots=True)
class StartFailed:
    """Sent instead of Ready by a worker whose routing cannot be built (a plug-in that loads in the daemon but
    raises in a worker), just before it exits: the parent says why, instead of an exit code."""
    error: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Sent every PROGRESS_EVERY seconds by the worker's heartbeat thread while it holds a file, whatever
    the processors cost per line; a frozen worker (SIGSTOP, a GIL held in C code) sends none."""
    bytes: int  # input bytes of the current file read so far
    lines: int  # input lines of the current file read so far
    stage: Stage
    index: int = 0  # the current file's place in the batch


@dataclass(frozen=True)
class Done:
    bytes_in: int
    lines_in: int
    bytes_out: int
    lines_out: dict[str, int] = field(default_factory=dict)  # output folder -> lines written
    duration: float = 0.0  # seconds, in the worker
    superseded: tuple[Superseded, ...] = ()  # earlier results replaced or set aside: logged and counted by the parent
    fresh: bool = True  # the publish added processed/NAME, where none stood (the processed/ count grows)


@dataclass(frozen=True)
class Rejected:
    """The input's (or a processor's) fault: the file goes to failed/ with this reason."""
    reason: str
    line: int | None = None
    bytes_in: int = 0
    lines_in: int = 0


@dataclass(frozen=True)
class Retry:
    """The machine's fault (full disk, EIO, a vanished output folder): the input stays claimed for a retry."""
    reason: str
    errno: int | None = None
    recreate: bool = False  # an output folder vanished: recreate the folders, then retry at once


Outcome = Done | Rejected | Retry


@dataclass(frozen=True)
class Outcomes:
    """Results of files of a batch, once durable (their group commit is done); the final one ends the batch
    (files not reported by then were taken back by the parent, or not reached)."""
    results: list[tuple[str, Outcome]]
    final: bool = True


ToParent = Ready | StartFailed | Heartbeat | Outcomes
