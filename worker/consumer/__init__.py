"""The Celery consumer: one process per GPU that classifies batches of scans (`lungcam worker`)."""
