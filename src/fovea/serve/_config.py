"""What ``fovea serve`` was asked for: one dataclass, carried to every uvicorn worker as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

CONFIG_ENV = "FOVEA_SERVE_CONFIG"  # the JSON of a ServeConfig, for ``uvicorn --factory`` (app_from_env)


@dataclass
class ServeConfig:
    model: str  # a registry reference (NAME, NAME:VERSION, NAME:ALIAS) or a model folder
    db: str | None = None
    device: str = "auto"
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_body_bytes: int = 20 * 2**20  # 20 MiB per request
    max_pixels: int = 64_000_000  # per image, checked from the header before decoding
    max_images: int = 64  # per request
    timeout_s: float = 30.0
    # Seconds a client has to send its whole body (408 after): without it a client trickling bytes holds a
    # connection and its buffers forever. At 30 s a typical 3 MiB phone photo needs 0.8 Mbit/s of upload; a body at
    # the 20 MiB limit needs 5.6 Mbit/s.
    body_timeout_s: float = 30.0
    log_predictions: bool = True
    hybrid: bool = False  # answer from precomputed batch predictions (same model version, same bytes) when stored
    poll_s: float = 2.0  # how often the server follows the store (production alias, deployments, canary steps)
    admin_token: str | None = None  # enables /v1/admin/*; sent as "Authorization: Bearer TOKEN"
    drift_every_s: float = 600.0  # the periodic drift check (0: off); needs the store and the model's reference
    drift_window: int = 500  # the newest answers it tests
    drift_webhook: str | None = None  # POSTed the result when drift is found
    review_below: float = 0.0  # answers less confident than this go to the review queue (0: none)
    consensus: int = 1  # reviewers who must agree before a queued image is labelled
    unknown: bool = True  # answer "unknown" where the model has a calibrated score (--no-unknown: closed-set)

    def to_json(self) -> str:
        return json.dumps(asdict(self))
