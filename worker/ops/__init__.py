"""Operator tools behind `lungcam`: ingest, status, results, report, requeue, migrate, and the demo."""
