"""What the Redis broker holds for each scan: classify messages waiting in a queue or held, unacknowledged, by a consumer.

kombu's Redis transport keeps a queue as a list (LPUSH to publish, BRPOP to consume, so the right
end is the head) and a delivered-but-unacknowledged message in the hash `unacked` (delivery tag ->
JSON [message, exchange, routing_key]) with its delivery time in the sorted set `unacked_index`.
A message is JSON whose `body` is base64 of the JSON [args, kwargs, embed]; our args are [scan_id].
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from shared.queueing import CLASSIFY_TASK, QUEUES


class NotRedis(Exception):
    """The broker is not kombu's Redis transport, so its messages cannot be inspected."""


@dataclass(frozen=True)
class HeldMessage:
    """A delivered, unacknowledged message: its delivery tag, when it was delivered and its ETA (epoch s)."""

    tag: str
    delivered_at: float
    eta: float | None = None


@dataclass
class BrokerSnapshot:
    """Scan ids with a message waiting in a queue, and the held messages of each scan."""

    waiting: set[str] = field(default_factory=set)
    held: dict[str, list[HeldMessage]] = field(default_factory=dict)

    def is_live(self, scan_id: str, now: float, hold_limit_s: float) -> bool:
        """Waiting in a queue, or held for less than hold_limit_s (after its ETA, for a countdown retry)."""
        if scan_id in self.waiting:
            return True
        return any(now - max(m.delivered_at, m.eta or 0.0) < hold_limit_s for m in self.held.get(scan_id, ()))


def decode_message(payload: dict[str, Any]) -> tuple[str | None, float | None]:
    """(scan id, ETA as epoch seconds) of a kombu Redis message, or (None, None) if it is not a classify task."""
    headers = payload.get("headers") or {}
    if headers.get("task") != CLASSIFY_TASK:
        return None, None
    body: Any = payload.get("body")  # untrusted JSON: decoding says what it is
    if (payload.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    try:
        args = json.loads(body)[0]
        scan_id = str(args[0])
    except (ValueError, TypeError, IndexError, KeyError):
        return None, None
    eta = headers.get("eta")
    if isinstance(eta, str):
        try:
            parsed = dt.datetime.fromisoformat(eta)
            eta_s: float | None = (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp()
        except ValueError:
            eta_s = None
    else:
        eta_s = None
    return scan_id, eta_s


class RedisBroker:
    """Reads and repairs the classify messages of a Redis broker, through the app's own kombu connection settings."""

    def __init__(self, app: Celery) -> None:
        """Inspect the broker app publishes to."""
        self.app = app

    @contextmanager
    def _channel(self) -> Iterator[Any]:
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            channel = connection.default_channel
            if not hasattr(channel, "unacked_key") or not hasattr(channel, "_q_for_pri"):
                raise NotRedis(f"broker transport {connection.transport_cls!r} is not redis")
            yield channel

    def snapshot(self) -> BrokerSnapshot:
        """One consistent (MULTI/EXEC) read of every queue list and the unacknowledged messages."""
        with self._channel() as channel, channel.conn_or_acquire() as client:
            keys = [channel._q_for_pri(queue, pri) for queue in QUEUES for pri in channel.priority_steps]
            pipe = client.pipeline(transaction=True)
            for key in dict.fromkeys(keys):
                pipe.lrange(key, 0, -1)
            pipe.hgetall(channel.unacked_key)
            pipe.zrange(channel.unacked_index_key, 0, -1, withscores=True)
            *lists, unacked, index = pipe.execute()
        snapshot = BrokerSnapshot()
        for items in lists:
            for raw in items:
                scan_id, _eta = decode_message(json.loads(raw))
                if scan_id is not None:
                    snapshot.waiting.add(scan_id)
        delivered = {_text(tag): score for tag, score in index}
        for tag, raw in unacked.items():
            tag = _text(tag)
            try:
                payload = json.loads(raw)[0]
            except (ValueError, IndexError):
                continue
            scan_id, eta = decode_message(payload)
            if scan_id is not None:
                # No index entry (a half-written append): treat it as delivered just now, i.e. live.
                held = HeldMessage(tag, float(delivered.get(tag, time.time())), eta)
                snapshot.held.setdefault(scan_id, []).append(held)
        return snapshot

    def restore(self, tags: Iterable[str]) -> set[str]:
        """Move held messages back to the head of their queue, as kombu does after the visibility timeout; returns those moved."""
        restored: set[str] = set()
        tags = list(tags)
        if not tags:
            return restored
        with self._channel() as channel, channel.conn_or_acquire() as client:
            for tag in tags:
                if client.transaction(
                    lambda pipe, tag=tag: self._restore_one(channel, pipe, tag),
                    channel.unacked_key,
                    value_from_callable=True,
                ):
                    restored.add(tag)
        return restored

    @staticmethod
    def _restore_one(channel: Any, pipe: Any, tag: str) -> bool:
        raw = pipe.hget(channel.unacked_key, tag)
        pipe.multi()
        if raw is None:
            return False  # acknowledged (or restored by kombu) in the meantime
        message, _exchange, routing_key = json.loads(raw)
        if routing_key not in QUEUES:
            return False
        message.setdefault("headers", {})["redelivered"] = True
        message.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
        priority = channel._get_message_priority(message, reverse=False)
        pipe.zrem(channel.unacked_index_key, tag)
        pipe.hdel(channel.unacked_key, tag)
        # RPUSH: the right end is the head (consumers BRPOP), so the message is taken next, not after the backlog.
        pipe.rpush(channel._q_for_pri(routing_key, priority), json.dumps(message))
        return True

    def try_lock(self, key: str, owner: str, ttl_ms: int) -> bool:
        """SET key owner NX PX ttl_ms: True if this caller now holds the lock."""
        with self._channel() as channel, channel.conn_or_acquire() as client:
            return bool(client.set(key, owner, nx=True, px=ttl_ms))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
