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
- RPC meets in the job's store (distenv.job_store_init_method), which already listens on loopback.
Multi-node jobs need the network: run them on a trusted network (docs/security.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

LOOPBACK = "127.0.0.1"
# Read only through set_loopback_env: the launcher and the ranks must agree on it.
_LOOPBACK_ENV = {
    "GLOO_SOCKET_IFNAME": "lo",
    "NCCL_SOCKET_IFNAME": "lo",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    "TP_SOCKET_IFNAME": "lo",
}


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


# Where rank 0 publishes the port its store listens on, a torch FileStore in the job dir: a port
# picked free by the launcher and bound seconds later by rank 0 (after torch's import) can be taken
# in between by any other process on the machine. The ranks learn the file from this variable.
PORT_FILE_ENV = "PARALAB_STORE_PORT_FILE"
PORT_FILE = ".store_port"


@contextlib.contextmanager
def fresh_port_file(job_dir: Path) -> Iterator[None]:
    """For the launcher: no port of an earlier run of this job dir is left for its ranks to read."""
    (job_dir / PORT_FILE).unlink(missing_ok=True)
    try:
        yield
    finally:
        (job_dir / PORT_FILE).unlink(missing_ok=True)


def loopback_store(port: int, world_size: int, is_master: bool, timeout: timedelta) -> dist.TCPStore:
    """A TCPStore whose server accepts connections on 127.0.0.1 only (torch's own binds to all
    interfaces): rank 0 hands it a socket already bound to loopback.

    Where the launcher names a port file (PORT_FILE_ENV), rank 0 binds any free port and
    publishes it there (one key per restart of the group), `port` is not used, and MASTER_PORT
    becomes the port."""
    file = os.environ.get(PORT_FILE_ENV)
    listener = None
    if is_master:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 0 if file else port))
        port = listener.getsockname()[1]
    if file:
        published = dist.FileStore(file, -1)
        published.set_timeout(timeout)
        key = f"port_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        if is_master:
            published.set(key, str(port))
        else:
            port = int(published.get(key))
        os.environ["MASTER_PORT"] = str(port)  # what else meets in this store (RPC) reads it
    if listener is None:
        return dist.TCPStore(LOOPBACK, port, world_size, False, timeout=timeout)
    listener.listen(256)
    # detach: the store owns the listening fd from now on; Python must never close it under it.
    return dist.TCPStore(
        LOOPBACK, port, world_size, True, timeout=timeout, master_listen_fd=listener.detach()
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now; every job gets its own rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
