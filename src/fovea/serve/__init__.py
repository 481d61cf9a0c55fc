"""Serving: the online server (``fovea serve``) with micro-batching, OIP v2 routes, metrics and logging.

``check_servable(model, db)`` says in one line why a model cannot be served; ``run(config, host, port,
workers)`` serves it with uvicorn; ``create_app(config)`` is the FastAPI application itself (for tests and
embedding).
"""

from fovea.serve._app import check_servable, create_app, run
from fovea.serve._batcher import MicroBatcher
from fovea.serve._config import ServeConfig

__all__ = ["MicroBatcher", "ServeConfig", "check_servable", "create_app", "run"]
