"""The ingestion and results HTTP API (FastAPI): submit scans and batches, read results, health and metrics.

`worker.api.main:create_app` builds the application; `lungcam api` serves it with uvicorn.
"""
