"""`ingestd worker`: a worker node. Dramatiq's own Worker (one process, N actor threads, each supervising one
ingestd child), /metrics and /healthz on its own port, a heartbeat in Redis for the scanner's status."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import dramatiq
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics

from ingestd import __version__
from ingestd.distributed import CLUSTER_ID, check_folder, queue
from ingestd.distributed.ledger import Ledger
from ingestd.distributed.task import Node
from ingestd.log import event
from ingestd.metrics import LATENCY_BUCKETS
from ingestd.names import key
from ingestd.notify import Notifier
from ingestd.settings import Settings
from ingestd.spool import Spool
from ingestd.web import Web, cannot_listen


class _Metrics:
    """The node's series, named as the single-machine daemon's where they mean the same (the dashboard groups by
    instance)."""

    def __init__(self, node: str, busy: Any) -> None:
        disable_created_metrics()  # *_created series double the output and no dashboard reads them
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        self.files = Counter("ingestd_files", "Files finished, by result (processed, failed)", ["result"], registry=r)
        for result in ("processed", "failed"):
            self.files.labels(result)
        self.bytes_in = Counter("ingestd_input_bytes", "Bytes read from input files", registry=r)
        self.bytes_out = Counter("ingestd_output_bytes", "Bytes written to published outputs", registry=r)
        self.duration = Histogram("ingestd_processing_duration_seconds", "Time to process one file in a child",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.last_success = Gauge("ingestd_last_success_timestamp_seconds", "When a file was last processed",
                                  registry=r)
        self.heartbeat = Gauge("ingestd_node_heartbeat_timestamp_seconds", "When this node last wrote its heartbeat "
                               "to Redis", ["node"], registry=r)
        self.node = node
        Gauge("ingestd_node_busy", "Files this node has in hand", registry=r).set_function(busy)

    def count(self, result: str, bytes_in: int = 0, bytes_out: int = 0, seconds: float | None = None) -> None:
        self.files.labels(result).inc()
        if result == "processed":
            self.bytes_in.inc(bytes_in)
            self.bytes_out.inc(bytes_out)
            if seconds is not None:
                self.duration.observe(seconds)
            self.last_success.set(time.time())


def run(settings: Settings, processes: int) -> int:
    """Run a node until SIGTERM or SIGINT (warm stop: files in hand finish within stop_timeout, or go back to the
    queue). Raises ConfigError for a bad listen address or an unreachable broker."""
    assert settings.broker is not None
    name = settings.node or socket.gethostname()
    client, broker = queue.connect(settings.broker, settings.lease_time)
    ledger = Ledger(client, settings.lease_time)
    spool = Spool(settings.watch_dir, settings.done_marker, tag=f"n{key(name)[:8]}-{os.getpid()}-",
                  seq=ledger.next_seq)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: event("reload_refused", "SIGHUP: a node does not reload its settings; "
                                                  "restart it to apply changes", logging.WARNING))
    node: Node
    metrics = _Metrics(name, lambda: len(node.current))
    node = Node(settings, ledger, spool, name, metrics.count)
    waiting: list[str] = []  # why the node takes no work yet; /healthz answers 503 with it meanwhile
    broker_down = False  # the last heartbeat could not reach Redis: /healthz 503 too
    host, port = _listen(settings)
    try:
        web = Web(host, port, metrics.registry, lambda: _status(name, node, processes),
                  lambda: waiting[0] if waiting else ("broker unreachable" if broker_down else None), page=False)
    except OSError as e:
        raise cannot_listen(f"{host}:{port}", e) from None
    web.start()
    notifier = Notifier()
    # Ready at once, waiting said in STATUS=: a node started before its scanner or its mount (a boot order) must
    # not fail its start and be restarted every TimeoutStartSec.
    notifier.ready()
    # Never spool.ensure(): folders made here on an unmounted mount point would hide that the share is missing.
    while (why := check_folder(spool.state, client, ledger.k(CLUSTER_ID))) is not None:
        if not waiting or why != waiting[0]:
            event("node_waiting", "waiting before taking work: " + why, logging.WARNING, node=name,
                  listen=web.address)
            notifier.status("waiting: " + why)
            waiting[:] = [why]
        notifier.watchdog()
        if stop.wait(1.0):
            web.stop()
            return 0
    waiting.clear()
    node.actor = queue.declare(broker, node.handle)
    worker = dramatiq.Worker(broker, queues={queue.QUEUE}, worker_threads=processes, worker_timeout=1000)
    # Dramatiq's default prefetch (2 per thread): with only one per thread each consumer sleeps between fetches
    # while all are in hand (about 1.6x fewer small files/s, tests/distributed bench); a prefetched message is
    # unacked, so a node's death still gives it back after lease_time.
    threading.Thread(target=node.leases.run, name="leases", daemon=True).start()
    worker.start()
    notifier.status(f"working: {processes} processes")
    event("node_started", "worker node started", node=name, processes=processes, version=__version__,
          listen=web.address, watch_dir=str(spool.root.resolve()), broker=queue.safe_url(settings.broker))
    beat = max(0.5, settings.lease_time / 3)
    first = True  # the first heartbeat at once: status lists the node as soon as it works
    while first or not stop.wait(min(beat, notifier.watchdog_interval or beat)):
        first = False
        notifier.watchdog()
        try:
            ledger.beat(name, _status(name, node, processes) | {"listen": web.address,
                                                                  "lease_time": settings.lease_time})
            metrics.heartbeat.labels(name).set(time.time())
        except Exception as e:  # noqa: BLE001 - Redis away: Dramatiq reconnects; the heartbeat is only status
            if not broker_down:
                event("broker_error", "cannot reach the broker; work resumes when it is back", logging.ERROR,
                      error=repr(e))
            broker_down = True
            continue
        if broker_down:
            event("broker_back", "the broker is reachable again")
            broker_down = False
    notifier.stopping()
    event("node_stopping", "worker node stopping", node=name)
    worker.stop(timeout=int(settings.stop_timeout * 1000))
    node.close()
    deadline = time.monotonic() + 5.0
    while node.current and time.monotonic() < deadline:
        time.sleep(0.05)  # actor threads give back the files their killed children had (their messages are sent)
    web.stop()
    try:
        ledger.leave(name)
    except Exception:  # noqa: BLE001 - best effort: a node that does not say goodbye is shown as missing
        pass
    return 0


def _status(name: str, node: Node, processes: int) -> dict[str, Any]:
    return {"node": name, "host": socket.gethostname(), "pid": os.getpid(), "processes": processes,
            "current": sorted(node.current.copy().values(), key=lambda c: c["since"])}  # copy: threads change it


def _listen(settings: Settings) -> tuple[str, int]:
    """A node's own port: --listen, else 127.0.0.1:9801 (9800 is the scanner's status page)."""
    if settings.listen == "127.0.0.1:9800":  # the default: the scanner's port
        return "127.0.0.1", 9801
    return settings.host_port

