"""Batch image classification library: catalog, training, registry, scoring. Knows nothing of Airflow."""
