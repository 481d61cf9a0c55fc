"""Property-based fuzzing of the server against its own /openapi.json (schemathesis, in-process over ASGI): for every
operation, requests that fit the schema and requests that break it, and neither may get a 5xx, a status the schema
does not list, or a body or content type other than the one it declares.

The budget is fixed (``EXAMPLES`` per operation and mode, seed ``SEED``) so that CI runs the same cases every time,
in ~20 s on 2 cores. A wider search, for a person hunting bugs: FOVEA_FUZZ_EXAMPLES=2000 (about 15 minutes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from conftest import train_cnn
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fovea.serve import ServeConfig, create_app

SEED = 18  # issue 18
EXAMPLES = int(os.environ.get("FOVEA_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance]
TOKEN = "fuzz"  # the admin routes are on, and the fuzzer holds the token: they run, not just answer 401
# The operations, read from a server that is built but not started (the schema needs no model).
OPERATIONS = [(method.upper(), path) for path, item in create_app(ServeConfig(model="-")).openapi()["paths"].items()
              for method in item]


@pytest.fixture(scope="module")
def schema(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    run = train_cnn(tiny_pets, tmp_path_factory, "serve_fuzz", image_size=16, epochs=1, widths=(4, 8))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FOVEA_HOME", str(tmp_path_factory.mktemp("fuzz_home")))  # its store: predictions, reviews
        app = create_app(ServeConfig(model=str(run), admin_token=TOKEN, review_below=1.0, drift_every_s=0))
        yield schemathesis.openapi.from_asgi("/openapi.json", app)  # which starts the app (its lifespan)
        asgi.shutdown_lifespans()


def _breakable(operation: Any) -> bool:
    """Whether any request can break the schema: not when the only inputs are path parameters any string fits."""
    return (any(len(getattr(operation, part)) for part in ("query", "headers", "cookies", "body"))
            or any(p.definition["schema"].get("type") != "string" for p in operation.path_parameters))


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_5xx_and_every_answer_as_the_schema_says(schema: Any, method: str, path: str) -> None:
    operation = schema[path][method]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @seed(SEED)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers={"authorization": f"Bearer {TOKEN}"}, checks=CHECKS)

        try:
            fuzz()
        except Unsatisfiable:  # no request breaks the schema: fine, if the schema says so
            assert mode is GenerationMode.NEGATIVE and not _breakable(operation), (mode, path)
