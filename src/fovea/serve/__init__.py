"""Serving: the online server (``fovea serve``) with micro-batching, OIP v2 routes, metrics and logging."""

from fovea.serve._app import ServeConfig, create_app
from fovea.serve._batcher import MicroBatcher

__all__ = ["MicroBatcher", "ServeConfig", "create_app"]
