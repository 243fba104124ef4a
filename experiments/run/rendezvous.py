"""Where a multi-node job's nodes meet: the endpoint checked before launch, and the wait for the
other nodes said out loud (bounded by launcher.join_timeout_s). Single-node jobs stay on loopback
(parallel/loopback.py)."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator

from experiments.config.schema import ConfigError, LauncherConfig

WAIT_NOTE_EVERY_S = 15.0


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"launcher.rdzv_endpoint={endpoint} must be <host>:<port> (port 1-65535)")
    return host.strip("[]"), int(port)


def check_endpoint(cfg: LauncherConfig) -> None:
    """An endpoint that does not resolve fails here, in one line, not after minutes of retries."""
    if cfg.name != "torchrun" or not cfg.rdzv_endpoint:
        return
    host, port = split_endpoint(cfg.rdzv_endpoint)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(
            f"launcher.rdzv_endpoint={cfg.rdzv_endpoint}: host {host!r} does not resolve ({e.strerror or e}); "
            "give node 0's hostname or IP address"
        ) from None


class _Joined(logging.Handler):
    def __init__(self, event: threading.Event):
        super().__init__(logging.INFO)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "has joined round" in str(record.msg):
            self.event.set()


RDZV_LOGGER = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"


@contextlib.contextmanager
def say_while_waiting(cfg: LauncherConfig, endpoint: str) -> Iterator[None]:
    """Multi-node: until every node has joined, say every few seconds what the agent waits for."""
    if cfg.nnodes == 1:
        yield
        return
    joined, stop = threading.Event(), threading.Event()
    handler = _Joined(joined)
    logger = logging.getLogger(RDZV_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)  # torch logs the completed join at INFO
    logger.addHandler(handler)
    deadline = time.monotonic() + cfg.join_timeout_s

    def note() -> None:
        wait = 2.0  # nodes started together have joined by then: nothing to say
        while not stop.wait(wait) and not joined.is_set():
            left = max(0, round(deadline - time.monotonic()))
            print(
                f"paralab: node {cfg.node_rank} waiting for all {cfg.nnodes} nodes (launcher.nnodes) to join "
                f"at {endpoint}; {left} s left (launcher.join_timeout_s={cfg.join_timeout_s})",
                file=sys.stderr,
                flush=True,
            )
            wait = WAIT_NOTE_EVERY_S

    thread = threading.Thread(target=note, name="paralab-join-note", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        logger.removeHandler(handler)
        logger.setLevel(level)
