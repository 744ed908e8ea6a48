"""The serving side: Celery app and tasks, GPU pinning, ingestion and the operator CLI."""
