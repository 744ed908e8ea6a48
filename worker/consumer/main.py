"""Starting a consumer: pin the GPU, load the models, bind the task, consume until stopped."""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


def run_worker(gpu: str, queues: list[str], loglevel: str, hostname: str | None = None) -> int:
    """Run one `lungcam worker` process that owns GPU `gpu` (or the CPU); returns its exit code."""
    from worker.consumer.gpu import configure_tensorflow, pin_gpu

    # Order matters: the GPU is chosen before anything imports TensorFlow.
    pinned = pin_gpu(gpu)
    configure_tensorflow()
    from shared.queueing import make_app
    from shared.settings import get_settings
    from worker.consumer.classifier import classifier_from_settings
    from worker.consumer.reconciler import Reconciler
    from worker.consumer.tasks import bind_classify_task

    settings = get_settings()
    # Models load here, in the main process, before consuming starts: loading them in a pool
    # initialiser (worker_process_init) can outlast the pool's start-up timeout and kill the worker.
    classifier = classifier_from_settings(settings, pinned_gpu=pinned)
    app = make_app(settings)
    bind_classify_task(app, classifier, settings)
    log.info("worker on CUDA_VISIBLE_DEVICES=%s serving %d model(s)", pinned, len(classifier.models))
    worker = app.Worker(
        queues=queues,
        loglevel=loglevel,
        hostname=hostname or f"lungcam-gpu{gpu}@{socket.gethostname()}",
        without_gossip=True,
        without_mingle=True,
    )
    # Recovery is the system's, not the broker's: leases on claimed scans, and a reconciler that
    # re-queues expired leases and lost messages (one worker acts per interval).
    classifier.leases.start()
    reconciler = Reconciler(app, classifier.sessions, settings, owner=classifier.leases.worker_id)
    reconciler.start()
    log.info(
        "leases of %d s; reconciler every %.0f s (re-sends queued scans after %d s without a live message)",
        settings.lease_s,
        settings.reconcile_interval_s,
        settings.requeue_after_s,
    )
    try:
        worker.start()
    finally:
        reconciler.stop()
        classifier.close()
    return worker.exitcode or 0
