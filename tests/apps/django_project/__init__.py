"""A real (minimal) Django project wired to Celery as Django's Celery guide shows."""
