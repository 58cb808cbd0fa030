# One image for every process of the service (worker, beat, flower, migrations).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN useradd --system --home /app comms

COPY pyproject.toml README.md ./
COPY comms_tasks ./comms_tasks
COPY schedules ./schedules
COPY celeryconfig.py alembic.ini ./
COPY migrations ./migrations
COPY templates ./templates
RUN pip install -e . && chown -R comms /app

USER comms
CMD ["celery", "-A", "comms_tasks", "worker", "--loglevel=INFO"]
