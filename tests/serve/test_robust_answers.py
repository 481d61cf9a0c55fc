"""The defects a fuzzer and a hand fuzz found (issue 18, part 3), one test each: ids past 64 bits, JSON nested past
the recursion limit, 5xx missing from /metrics, a schema without bodies or error answers, 405 without Allow, a body
trickled in forever, client disconnects logged as errors, and too many multipart files answered 400."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_main, train_cnn
from fastapi.testclient import TestClient

from fovea import review
from fovea.serve import ServeConfig, create_app

PAST_64_BITS = 2**63  # one past SQL's BIGINT


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "serve_robust", image_size=16, epochs=1, widths=(4, 8))


def client(run: Path, **kw: Any) -> TestClient:
    return TestClient(create_app(ServeConfig(model=str(run), **kw)), raise_server_exceptions=False)


def test_ids_past_64_bits_are_refused_with_422_not_500(run: Path) -> None:
    with client(run) as c:  # logging on: the store is there, so the id would reach SQL
        for method, url in (("GET", f"/v1/reviews/{PAST_64_BITS}/image"), ("POST", f"/v1/reviews/{PAST_64_BITS}"),
                            ("GET", f"/v1/models/{PAST_64_BITS}/report"), ("GET", f"/v1/reviews/{-PAST_64_BITS - 1}/image")):
            r = c.request(method, url, json={"label": "cat"} if method == "POST" else None)
            assert r.status_code == 422, (url, r.text)
            assert "less than or equal to 9223372036854775807" in r.json()["error"] or "greater than" in r.json()["error"]
        assert c.get("/v1/reviews/9223372036854775807/image").status_code == 404  # the largest id: no such review


def test_json_nested_past_the_recursion_limit_is_422(run: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with client(run, log_predictions=False) as c:
        for url in ("/v1/predict", "/v1/feedback", "/v2/models/cnn/infer"):
            r = c.post(url, content=deep, headers={"content-type": "application/json"})
            assert r.status_code == 422, (url, r.text)
            assert "nested too deeply" in r.json()["error"], url
        assert 'status="500"' not in c.get("/metrics").text


def test_a_500_is_answered_in_json_logged_once_and_counted_on_metrics(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(review, "reviews", broken)
    with client(run) as c, caplog.at_level(logging.INFO, logger="fovea.serve"):
        r = c.get("/v1/reviews")
        assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError"}
        metrics = c.get("/metrics").text
    assert 'fovea_errors_total{model_version="0",status="500"} 1.0' in metrics
    assert 'fovea_requests_total{model_version="0",route="/v1/reviews",status="500"} 1.0' in metrics
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # a bug keeps its traceback


def test_the_schema_declares_bodies_errors_and_metrics_as_text(run: Path) -> None:
    with client(run, log_predictions=False) as c:
        spec = c.get("/openapi.json").json()
        r = c.put("/v1/predict")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
    ops = {(m.upper(), p): op for p, path in spec["paths"].items() for m, op in path.items()}
    for (method, path), op in ops.items():
        if path.startswith("/v1/") and method == "POST" and path != "/v1/drift/check":  # the one that reads none
            assert op.get("requestBody", {}).get("content"), (method, path)
        if path.startswith("/v1/"):
            assert any(s.startswith("4") for s in op["responses"]), (method, path)
            assert all(s.startswith("2") or op["responses"][s]["content"]["application/json"]["schema"]
                       == {"$ref": "#/components/schemas/Problem"} for s in op["responses"]), (method, path)
    predict = ops["POST", "/v1/predict"]
    assert {"image/*", "multipart/form-data", "application/json"} <= set(predict["requestBody"]["content"])
    assert {"408", "413", "415", "422", "504"} <= set(predict["responses"])
    assert "201" in ops["POST", "/v1/feedback"]["responses"] and "201" in ops["POST", "/v1/admin/deploy"]["responses"]
    assert "200" not in ops["POST", "/v1/feedback"]["responses"]
    assert ops["GET", "/v1/reviews/{review_id}/image"]["parameters"][0]["schema"]["maximum"] == 2**63 - 1
    assert list(ops["GET", "/metrics"]["responses"]["200"]["content"]) == ["text/plain"]


async def _send(app: Any, path: str, headers: dict[str, str], chunks: list[bytes | None]) -> list[dict[str, Any]]:
    """One request straight to the ASGI app: each chunk sent in turn, 0.05 s apart; None is the client hanging up,
    and past the last chunk the client stalls (it never finishes its body)."""
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("test", 80), "client": ("c", 1),
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    queue = list(chunks)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not queue:
            await asyncio.sleep(3600)
        await asyncio.sleep(0.05)
        chunk = queue.pop(0)
        if chunk is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


PART = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'  # a file part begins


def test_a_body_trickled_in_is_cut_off_with_408(run: Path) -> None:
    with client(run, log_predictions=False, body_timeout_s=0.5) as c:
        for ctype in ("image/jpeg", "application/json", "multipart/form-data; boundary=x"):
            sent = c.portal.call(_send, c.app, "/v1/predict", {"content-type": ctype}, [PART] + [b"x"] * 100)  # 5 s
            assert sent[0]["status"] == 408, ctype
            assert b"did not arrive within 0.5 s" in sent[1]["body"]
        sent = c.portal.call(_send, c.app, "/v1/feedback", {"content-type": "application/json"}, [b"{"])  # stalls
        assert sent[0]["status"] == 408


def test_serve_has_a_body_timeout_option(run: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from fovea import serve

    seen: list[ServeConfig] = []
    monkeypatch.setattr(serve, "check_servable", lambda *a: None)
    monkeypatch.setattr(serve, "run", lambda config, **kw: seen.append(config))
    assert run_main(["serve", str(run), "--body-timeout", "7.5"], monkeypatch, capsys)[0] == 0
    assert run_main(["serve", str(run)], monkeypatch, capsys)[0] == 0
    assert [c.body_timeout_s for c in seen] == [7.5, 30.0]


def test_a_client_that_hangs_up_is_one_info_line_without_traceback(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    with client(run, log_predictions=False) as c, caplog.at_level(logging.DEBUG):
        for ctype in ("image/jpeg", "multipart/form-data; boundary=x"):
            c.portal.call(_send, c.app, "/v1/predict", {"content-type": ctype}, [PART, b"abc", None])
        metrics = c.get("/metrics").text
    records = [r for r in caplog.records if "disconnect" in r.getMessage()]
    assert len(records) == 2 and all(r.levelno == logging.INFO and r.exc_info is None for r in records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert 'fovea_errors_total{model_version="0",status="499"} 2.0' in metrics


def test_a_multipart_with_too_many_files_is_413(run: Path) -> None:
    with client(run, log_predictions=False, max_images=8) as c:
        r = c.post("/v1/predict", files=[("file", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(200)])
        assert r.status_code == 413 and "the limit is 8 images" in r.json()["error"]
        r = c.post("/v1/predict", files=[("file", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(9)])
        assert r.status_code == 413  # 9 of 8: Starlette's own limit, as the declared one


def test_a_chunked_multipart_over_the_body_limit_is_413(run: Path) -> None:
    """No Content-Length to refuse up front: the parts are counted as they stream in, not spooled to disk first."""
    with client(run, log_predictions=False, max_body_bytes=4096) as c:
        sent = c.portal.call(_send, c.app, "/v1/predict", {"content-type": "multipart/form-data; boundary=x"},
                             [PART] + [b"x" * 1024] * 8)
        assert sent[0]["status"] == 413 and b"over the limit of 4,096 bytes" in sent[1]["body"]


def test_an_unknown_deploy_strategy_is_a_bad_request_not_a_conflict(run: Path) -> None:
    with client(run, admin_token="t") as c:
        r = c.post("/v1/admin/deploy", json={"model": "cnn:0", "strategy": "yolo"},
                   headers={"authorization": "Bearer t"})
        assert r.status_code == 422 and "choose from shadow, canary, blue-green" in r.json()["error"]


def test_huge_uploads_decode_one_at_a_time_while_others_are_answered(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two uploads over the large-request threshold hold the large decoder thread (here: until released); a small
    request meanwhile is answered at once, and a large one still waiting past the time limit is a 504 saying why."""
    from PIL import Image

    from fovea.serve import _service

    def png(side: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (200, 120, 40)).save(buf, "PNG")
        return buf.getvalue()

    release = threading.Event()
    real = _service.decode_files

    def decode_files(model: Any, blobs: list[bytes], *a: Any) -> Any:
        if len(blobs) > 1:  # a large upload: as slow as it likes, until released
            release.wait(20)
        return real(model, blobs, *a)

    monkeypatch.setattr(_service, "decode_files", decode_files)
    monkeypatch.setattr(_service, "LARGE_REQUEST_PIXELS", 100_000)
    big, small = [("file", (f"{i}.png", png(400), "image/png")) for i in range(2)], png(40)
    with client(run, log_predictions=False, timeout_s=3.0) as c:
        answers: list[Any] = []
        uploads = [threading.Thread(target=lambda: answers.append(c.post("/v1/predict", files=big)))
                   for _ in range(2)]
        for t in uploads:
            t.start()
        time.sleep(0.3)  # both are in: one decoding, one queued behind it
        r = c.post("/v1/predict", content=small, headers={"content-type": "image/png"})
        assert r.status_code == 200 and not release.is_set() and not answers  # answered while both still wait
        for t in uploads:
            t.join(30)
        release.set()
    # the first holds the thread past the 3 s limit (504); the second waited behind it (504): both say why
    assert sorted(a.status_code for a in answers) == [504, 504]
    assert all("megapixels" in a.json()["error"] and "send smaller images" in a.json()["error"] for a in answers)
