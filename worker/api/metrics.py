"""Prometheus metrics computed from the database at scrape time (the workers do the work, not the API)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import Status
from shared.models import Prediction, Scan

log = logging.getLogger(__name__)


class DatabaseCollector(Collector):
    """Scans per status and inference time per model, read from SQL on every scrape."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        """Read through sessions from this factory."""
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        """Yield the scan gauges, the inference summary, and whether the database could be read."""
        up = GaugeMetricFamily("lungcam_metrics_database_up", "1 if the last scrape could read the database.")
        try:
            with self.sessions() as session:
                by_status = dict(session.execute(select(Scan.status, func.count()).group_by(Scan.status)).all())
                timings = session.execute(
                    select(
                        Prediction.model_name,
                        Prediction.model_version,
                        func.count(Prediction.inference_ms),
                        func.coalesce(func.sum(Prediction.inference_ms), 0.0),
                    ).group_by(Prediction.model_name, Prediction.model_version)
                ).all()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even when the database is down
            log.warning("metrics: database unavailable: %s", type(exc).__name__)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up

        scans = GaugeMetricFamily("lungcam_scans", "Scans per status, from the scans table.", labels=["status"])
        for status in Status:
            scans.add_metric([status.value], float(by_status.get(status.value, 0)))
        yield scans

        inference = SummaryMetricFamily(
            "lungcam_inference_seconds",
            "Model inference time per scan (batched passes divided by batch size), from the predictions table.",
            labels=["model_name", "model_version"],
        )
        for model_name, model_version, count, total_ms in timings:
            inference.add_metric(
                [model_name, model_version], count_value=int(count), sum_value=float(total_ms or 0.0) / 1000.0
            )
        yield inference


def make_registry(sessions: sessionmaker[Session]) -> CollectorRegistry:
    """A registry of this app's own (the global one would mix several apps in one process, as tests make)."""
    # auto_describe=False: registering must not query the database (it may not be migrated yet).
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(sessions))
    return registry
