"""The Celery app: broker, queues and the settings that make long GPU batches safe on Redis."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from shared.settings import Settings

CLASSIFY_TASK = "lungcam.classify"
STAT_QUEUE = "stat"
ROUTINE_QUEUE = "routine"
# Listed in the order a worker drains them: every stat message before any routine one.
QUEUES = (STAT_QUEUE, ROUTINE_QUEUE)


def broker_url_for(settings: Settings) -> str:
    """The configured broker URL, or the embedded Redis under the data folder."""
    if settings.broker_url:
        return settings.broker_url
    from worker.embedded import start_embedded_redis

    return start_embedded_redis(settings.resolved_data_dir())


def make_app(settings: Settings, *, broker_url: str | None = None) -> Celery:
    """A Celery app configured for lungcam; publishing and consuming share this configuration."""
    app = Celery("lungcam", broker=broker_url or broker_url_for(settings))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in SQL, not in a result backend
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue=ROUTINE_QUEUE,
        task_default_exchange=ROUTINE_QUEUE,
        task_default_routing_key=ROUTINE_QUEUE,
        # Ack after the batch is written, so a worker that dies mid-batch loses nothing: its
        # unacked messages go back to the queue. celery-batches acks late requests when the
        # batch *returns*, even if it raised, so failures are retried explicitly in the task.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # celery-batches buffers messages inside the consumer until it has `batch_size` of them;
        # prefetch must cover one batch being processed plus the next one filling, or the buffer
        # never reaches the flush size and every batch waits for the flush timer instead.
        # (prefetch = multiplier x concurrency = one batch per pipeline slot.)
        worker_prefetch_multiplier=settings.batch_size,
        worker_concurrency=settings.pipeline_depth,
        worker_pool="threads",  # never fork once TensorFlow has started; threads share the loaded models
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Redis redelivers an unacked message after this long *even while its batch is still
            # running*: it must exceed the slowest batch, or work is done twice (harmless because
            # the task is idempotent, but wasteful). It is also how long a crashed worker's scans
            # wait before another worker picks them up.
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu scans for expired unacked messages every interval x throttle seconds (100 s by
            # default); scanning every 10 s bounds how long a crashed worker's scans sit idle.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # "priority": BRPOP lists the queues in QUEUES order every time, so stat goes first.
            "queue_order_strategy": "priority",
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app
