"""What every lungcam program runs on: its services, waiting for a batch, worker readiness, and exit codes.

Not a program itself: the API, the consumer, the operator tools and the PACS programs all import it,
so each opens its database, store and broker the same way and ends with the same exit codes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only for annotations: importing the runtime (for its exit codes, say) loads no client library.
    from celery import Celery
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from shared.results import BatchProgress
    from shared.settings import Settings
    from shared.store import ObjectStore

# Exit codes of every `lungcam` command (the README and `lungcam --help` list them).
OK = 0
NOT_FOUND = 1  # no such batch, no images, nothing to do
ERROR = 2  # a LungcamError or an unreachable service: one line on stderr
TIMEOUT = 3  # --timeout passed before the batch finished
SOME_FAILED = 4  # the batch finished, but at least one scan failed (its reason is in the results)
INTERRUPTED = 130

# A batch with queued scans and none running for this long gets a line saying what it waits for.
IDLE_NOTICE_S = 15.0


@dataclass
class Services:
    """Settings, the database engine and its session factory, the object store and (for programs that queue) Celery."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ObjectStore
    app: Celery | None

    def celery(self) -> Celery:
        """The Celery app; only for services opened with_app=True."""
        if self.app is None:
            raise RuntimeError("these services were opened without a Celery app (with_app=False)")
        return self.app

    def close(self) -> None:
        """Release broker connections and database pools."""
        if self.app is not None:
            self.app.close()
        self.engine.dispose()


def open_engine(settings: Settings) -> Engine:
    """An engine on the configured database whose schema is at head (SchemaError otherwise, engine disposed)."""
    from shared.engine import make_engine, require_current_schema

    engine = make_engine(settings.resolved_database_url())
    try:
        require_current_schema(engine)
    except Exception:
        engine.dispose()
        raise
    return engine


def open_services(
    settings: Settings | None = None,
    *,
    with_app: bool = True,
    broker_url: str | None = None,
) -> Services:
    """Open the services for settings (default: the environment's); the schema must be at head."""
    from shared.engine import make_session_factory
    from shared.queueing import make_app
    from shared.settings import get_settings
    from shared.store import store_from_settings

    settings = settings or get_settings()
    engine = open_engine(settings)
    try:
        store = store_from_settings(settings)
        app = make_app(settings, broker_url=broker_url) if with_app else None
    except Exception:
        engine.dispose()
        raise
    return Services(settings, engine, make_session_factory(engine), store, app)


@contextmanager
def running_services(settings: Settings | None = None, **options: Any) -> Iterator[Services]:
    """open_services for the length of a block, closed after it."""
    services = open_services(settings, **options)
    try:
        yield services
    finally:
        services.close()


def progress_bar(total: int, description: str) -> Any:
    """A tqdm bar on stderr counting scans."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="scan", file=sys.stderr, dynamic_ncols=True)


@dataclass
class _IdleNotice:
    """Says, at most every IDLE_NOTICE_S, that queued scans wait and none runs, instead of a frozen bar."""

    clock: Callable[[], float]
    idle_since: float = 0.0
    said_at: float = 0.0

    def __post_init__(self) -> None:
        self.idle_since = self.clock()

    def observe(self, progress: BatchProgress, moved: bool, bar: Any) -> None:
        """Note whether the batch moved; write the notice when it has been still for long enough."""
        now = self.clock()
        if moved or progress.counts.get("running"):
            self.idle_since = now
        elif now - self.idle_since >= IDLE_NOTICE_S and now - self.said_at >= IDLE_NOTICE_S:
            bar.write(
                f"lungcam: waiting for a worker: {progress.counts.get('queued', 0)} queued, none running for "
                f"{now - self.idle_since:.0f} s (is a `lungcam worker` consuming this broker? still loading models?)",
                file=sys.stderr,
            )
            self.said_at = now


def wait_for_batch(
    sessions: sessionmaker[Session],
    batch_id: str,
    timeout: float | None,
    *,
    description: str = "screening",
    check: Callable[[], None] | None = None,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> BatchProgress | None:
    """Show a progress bar until the batch has no queued or running scans; its last progress, or None on timeout.

    check runs before every poll (e.g. to raise when a child process died). The batch must exist.
    """
    from shared.results import get_batch_progress

    def current() -> BatchProgress:
        with sessions() as session:
            found = get_batch_progress(session, batch_id)
        assert found is not None  # batches are never deleted while followed
        return found

    progress = current()
    deadline = clock() + timeout if timeout else None
    idle = _IdleNotice(clock)
    with progress_bar(progress.total, description) as bar:
        while True:
            if check is not None:
                check()
            progress = current()
            idle.observe(progress, progress.finished != bar.n, bar)
            bar.n = progress.finished
            bar.set_postfix(
                done=progress.counts.get("done", 0),
                failed=progress.counts.get("failed", 0),
                skipped=progress.counts.get("skipped", 0),
                refresh=False,
            )
            bar.refresh()
            if progress.complete:
                return progress
            if deadline is not None and clock() > deadline:
                return None
            sleep(poll_s)


def batch_exit_code(progress: BatchProgress) -> int:
    """SOME_FAILED when a scan of the finished batch failed, else OK."""
    return SOME_FAILED if progress.counts.get("failed", 0) else OK


def follow(sessions: sessionmaker[Session], batch_id: str, timeout: float | None, **options: Any) -> int:
    """Wait for a batch like `lungcam status` and return its exit code (NOT_FOUND, TIMEOUT, SOME_FAILED or OK).

    options go to wait_for_batch (check, poll_s, clock, sleep).
    """
    from shared.results import get_batch_progress

    with sessions() as session:
        exists = get_batch_progress(session, batch_id) is not None
    if not exists:
        print(f"lungcam: no batch {batch_id}", file=sys.stderr)
        return NOT_FOUND
    progress = wait_for_batch(sessions, batch_id, timeout, **options)
    if progress is None:
        print(f"lungcam: batch {batch_id} not finished after {timeout:.0f} s", file=sys.stderr)
        return TIMEOUT
    counts = progress.counts
    print(
        f"batch {batch_id}: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
        f"{counts.get('skipped', 0)} skipped of {progress.total}"
    )
    if counts.get("failed", 0):
        print(
            f"lungcam: {counts['failed']} scan(s) failed; `lungcam results {batch_id}` gives each reason",
            file=sys.stderr,
        )
    return batch_exit_code(progress)


def workers_answering(app: Celery, *, hostname: str | None = None, timeout: float = 1.0) -> list[str]:
    """Names of the workers that answer a Celery ping within timeout (only hostname, when given)."""
    destination = [hostname] if hostname else None
    replies = app.control.ping(destination=destination, timeout=timeout) or []
    return [name for reply in replies for name in reply]
