"""`lungcam requeue` re-sends only scans without a live message in Redis: a waiting or held message is not duplicated."""

from __future__ import annotations

import datetime as dt
import json
import os
from contextlib import ExitStack
from pathlib import Path

import redis
from helpers import redis_url

from shared.broker_state import decode_message
from shared.engine import make_engine, make_session_factory, migrate
from shared.models import utcnow
from shared.queueing import QUEUES, make_app, publish
from shared.requeue import requeue_stale
from shared.scans import NewScan, add_scans
from shared.settings import Settings

REDIS_URL = os.environ.get("LUNGCAM_TEST_REQUEUE_REDIS_URL", redis_url(14))


def _messages_per_scan(client: redis.Redis) -> dict[str, int]:
    """Classify messages per scan id, waiting in the queues or held unacknowledged."""
    counts: dict[str, int] = {}
    raws = [raw for queue in QUEUES for raw in client.lrange(queue, 0, -1)]
    raws += [json.dumps(json.loads(raw)[0]) for raw in client.hvals("unacked")]
    for raw in raws:
        scan_id, _eta = decode_message(json.loads(raw))
        if scan_id is not None:
            counts[scan_id] = counts.get(scan_id, 0) + 1
    return counts


def test_requeue_leaves_waiting_and_held_messages_alone_and_sends_the_lost_one(tmp_path: Path):
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    app = make_app(Settings(broker_url=REDIS_URL, database_url=url))
    cleanup = ExitStack()
    try:
        long_ago = utcnow() - dt.timedelta(hours=2)
        with sessions.begin() as session:
            add_scans(
                session,
                [NewScan(s, f"scans/{s}", submitted_at=long_ago) for s in ("waiting", "held", "lost")],
                None,
            )
        publish(app, "held", "routine")  # taken by a consumer below, not acknowledged: held, live
        # The consumer's connection stays open (kombu puts its unacknowledged messages back when it closes).
        consumer = app.connection_for_read()
        cleanup.callback(consumer.release)
        assert consumer.default_channel.basic_get("routine", no_ack=False) is not None
        assert client.hlen("unacked") == 1
        publish(app, "waiting", "routine")  # in the queue
        assert _messages_per_scan(client) == {"held": 1, "waiting": 1}

        result = requeue_stale(sessions, app, older_than_s=3600)
        assert result.published == ["lost"] and sorted(result.live) == ["held", "waiting"] and result.restored == []
        assert _messages_per_scan(client) == {"held": 1, "waiting": 1, "lost": 1}

        # Run again with a tiny --older-than: lost was stamped as published just now and its message waits;
        # the held message now counts as held too long (its consumer is gone), so it goes back to its queue.
        again = requeue_stale(sessions, app, older_than_s=0.001)
        assert again.published == [] and again.restored == ["held"] and sorted(again.live) == ["lost", "waiting"]
        assert client.hlen("unacked") == 0
        assert _messages_per_scan(client) == {"held": 1, "waiting": 1, "lost": 1}
    finally:
        cleanup.close()
        app.close()
        engine.dispose()
        client.flushdb()
