"""Batch prediction: every image of a folder or CSV predicted into the store, resumable and idempotent."""

from fovea.batch._batch import BatchResult, export_parquet, run_batch

__all__ = ["BatchResult", "export_parquet", "run_batch"]
