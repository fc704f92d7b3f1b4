"""Airflow with the CeleryExecutor, run for real: Redis broker, PostgreSQL metadata, two workers."""
