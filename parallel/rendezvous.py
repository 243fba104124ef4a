"""Where ranks meet. On one node everything listens on loopback only; across nodes, the wait for
the other nodes is said out loud and bounded by launcher.join_timeout_s.

torch's stores listen on every interface, have no authentication and (the rendezvous state) are
read with pickle. What torch offers to keep a single-node job off the network, used here:
- the elastic agent's rendezvous can live in a FileStore (c10d backend, `store_type=file`);
- `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` stops the agent from serving a TCPStore to its workers;
  the workers' own store is then a TCPStore given an already-bound loopback socket
  (`master_listen_fd`, see `loopback_store`);
- gloo and NCCL pick their interface from `GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME` (`lo`),
  TensorPipe (torch.distributed.rpc) from `TP_SOCKET_IFNAME`;
- RPC builds its own store from an init_method URL: a rendezvous handler registered for
  `paralab-loopback://` hands it `loopback_store`'s store instead (`loopback_init_method`).
Multi-node jobs need the network: run them on a trusted network (README, Security).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import parse_qsl, urlparse

import torch.distributed as dist

from experiments.config import ConfigError, LauncherConfig

LOOPBACK = "127.0.0.1"
# Read only through set_loopback_env: the launcher and the ranks must agree on it.
_LOOPBACK_ENV = {
    "GLOO_SOCKET_IFNAME": "lo",
    "NCCL_SOCKET_IFNAME": "lo",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    "TP_SOCKET_IFNAME": "lo",
}
LOOPBACK_SCHEME = "paralab-loopback"
WAIT_NOTE_EVERY_S = 15.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def set_loopback_env() -> list[str]:
    """Keep a single-node job's sockets on loopback, in this process and the ones it starts.

    A value the user set is kept. Returns the names it added, for a caller that takes them back.
    """
    added = {k: v for k, v in _LOOPBACK_ENV.items() if k not in os.environ}
    os.environ.update(added)
    return list(added)


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """set_loopback_env for the launcher while it runs one job: the next job of a sweep may be multi-node."""
    added = set_loopback_env()
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def loopback_store(port: int, world_size: int, is_master: bool, timeout: timedelta) -> dist.TCPStore:
    """A TCPStore whose server accepts connections on 127.0.0.1 only (torch's own binds to all
    interfaces): rank 0 hands it a socket already bound to loopback."""
    if not is_master:
        return dist.TCPStore(LOOPBACK, port, world_size, False, timeout=timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, port))
    listener.listen(256)
    # detach: the store owns the listening fd from now on; Python must never close it under it.
    return dist.TCPStore(
        LOOPBACK, port, world_size, True, timeout=timeout, master_listen_fd=listener.detach()
    )


def _loopback_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **_: object):
    """torch.distributed.rendezvous for `paralab-loopback://127.0.0.1:<port>`; rendezvous() adds
    this rank and the world size to the query."""
    parsed = urlparse(url)
    query = dict(parse_qsl(parsed.query))
    rank, world = int(query["rank"]), int(query["world_size"])
    if parsed.port is None:
        raise ValueError(f"{url}: no port")
    yield loopback_store(parsed.port, world, rank == 0, timeout), rank, world
    raise RuntimeError(f"{LOOPBACK_SCHEME}:// cannot rendezvous again")


def loopback_init_method(port: int) -> str:
    """An init_method URL for what builds its own store (RPC): its store then listens on loopback only."""
    with contextlib.suppress(RuntimeError):  # registered by an earlier call in this process
        dist.register_rendezvous_handler(LOOPBACK_SCHEME, _loopback_rendezvous)
    return f"{LOOPBACK_SCHEME}://{LOOPBACK}:{port}"


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
