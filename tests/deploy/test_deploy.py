"""Roll-outs against a live server on a model trained on real photos: canary share and stickiness, automatic
rollback of a broken candidate, stepping and promotion, blue-green under concurrent load, shadow figures,
admin routes and the CLI."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_main, train_cnn
from fastapi.testclient import TestClient
from PIL import Image

import fovea
from fovea import deploy, model_registry
from fovea.artifact import read_meta
from fovea.errors import FoveaError
from fovea.runtime import save_model
from fovea.serve import ServeConfig, create_app
from fovea.store import Store


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "deploy", image_size=32, epochs=4, widths=(8, 16, 16, 16))


@pytest.fixture(scope="module")
def broken(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture with freshly initialised (random) weights."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    net = fovea.load(run, "cpu").net
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return save_model(tmp_path_factory.mktemp("broken") / "cnn", net, read_meta(run))


@pytest.fixture(scope="module")
def photos(tiny_pets: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((tiny_pets / "val").glob("*/*.jpg"))]


def server(**kw: Any) -> TestClient:
    return TestClient(create_app(ServeConfig(model="pets", poll_s=0.1, **kw)))


def post(c: TestClient, image: bytes, client: str | None = None) -> dict[str, Any]:
    headers = {"content-type": "image/jpeg", **({"x-client-id": client} if client else {})}
    r = c.post("/v1/predict", content=image, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def wait_for(condition: Any, seconds: float = 30, every: Any = None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {seconds} s")
        if every:
            every()
        time.sleep(0.05)


def state(d: deploy.View) -> str:
    return deploy.refresh(d, Store()).state


def test_a_10_percent_canary_answers_10_percent_and_is_sticky_per_client(run: Path, photos: list[bytes]) -> None:
    model_registry.add(run, "pets")  # version 1 becomes production
    model_registry.add(run, "pets")
    d = deploy.start("pets:2", "canary", percent=10, interval_s=3600)
    assert d.steps == [10, 25, 50, 100] and d.percent == 10
    with server(log_predictions=False) as c:
        versions = [post(c, photos[i % len(photos)])["model_version"] for i in range(2000)]
        share = versions.count(2) / len(versions)
        assert 0.07 <= share <= 0.13, share  # the 10 +- 3 %; without client ids it is exactly 10 %
        assert versions.count(2) == 200 and set(versions) == {1, 2}
        assert 'fovea_canary_percent{model_version="2"} 10.0' in c.get("/metrics").text
        seen: dict[str, set[int]] = {}
        for k in range(300):
            client = f"user-{k}"
            for image in photos[:3]:
                seen.setdefault(client, set()).add(post(c, image, client)["model_version"])
    assert all(len(v) == 1 for v in seen.values())  # sticky: one client, one version
    in_canary = [k for k, v in seen.items() if v == {2}]
    assert 10 <= len(in_canary) <= 55  # about 10 % of 300 clients (30 +- 4.5 sd)
    assert all(deploy.sticky_bucket(d.id, k) < 25 for k in in_canary)  # and they stay in as the share grows


def test_a_broken_candidate_is_rolled_back_automatically(run: Path, broken: Path, photos: list[bytes]) -> None:
    model_registry.add(run, "pets")
    model_registry.add(broken, "pets")
    d = deploy.start("pets:2", "canary", percent=50, interval_s=3600, thresholds={"min_samples": 20})
    with server() as c:
        answered: list[int] = []
        wait_for(lambda: state(d) == "rolled_back",
                 every=lambda: answered.append(post(c, photos[len(answered) % len(photos)])["model_version"]))
        after = {post(c, image)["model_version"] for image in photos[:20]}
        served = c.get("/metrics").text
    final = deploy.refresh(d, Store())
    print(f"rolled back after {len(answered)} requests: {final.reason}")
    assert final.reason and final.reason.startswith("automatic rollback at 50 %")
    assert "agreement" in final.reason or "confidence" in final.reason, final.reason
    assert 2 in answered and after == {1}  # it did answer some, and answers none after the rollback
    assert deploy.production("pets", Store()).version == 1
    assert 'fovea_background_predictions_total{model_version="1",outcome="ok",role="reference"}' in served
    events = deploy.deployments("pets")[0].events
    assert [e["kind"] for e in events] == ["started", "rolled_back"] and events[-1]["stats"]["candidate"]["n"] >= 20


def test_a_healthy_canary_steps_up_and_is_promoted_then_rolled_back_instantly(run: Path, photos: list[bytes]) -> None:
    model_registry.add(run, "pets")
    model_registry.add(run, "pets")
    d = deploy.start("pets:2", "canary", steps=[50, 100], interval_s=0.5, thresholds={"min_samples": 10})
    with server() as c:
        answered: list[int] = []
        wait_for(lambda: state(d) == "promoted",
                 every=lambda: answered.append(post(c, photos[len(answered) % len(photos)])["model_version"]))
        wait_for(lambda: post(c, photos[0])["model_version"] == 2, 10)
        assert deploy.production("pets", Store()).version == 2
        kinds = [e["kind"] for e in deploy.deployments("pets")[0].events]
        assert kinds == ["started", "step", "promoted"]
        rolled = deploy.rollback("pets", reason="users complained")
        assert rolled.state == "rolled_back" and deploy.production("pets", Store()).version == 1
        wait_for(lambda: post(c, photos[0])["model_version"] == 1, 5)  # version 1 was still loaded: no reload
    with pytest.raises(FoveaError, match="nothing to roll back"):
        deploy.rollback("pets")


def test_a_blue_green_switch_during_200_concurrent_requests_drops_none(run: Path, photos: list[bytes]) -> None:
    model_registry.add(run, "pets")
    model_registry.add(run, "pets")
    with server(log_predictions=False) as c:
        results: list[Any] = []
        stop = threading.Event()

        def client(i: int) -> None:  # 200 clients, each asking again as soon as it has its answer
            while not stop.is_set():
                try:
                    r = c.post("/v1/predict", content=photos[i % len(photos)], headers={"content-type": "image/jpeg"})
                    results.append((r.status_code, r.json().get("model_version")))
                except Exception as e:  # noqa: BLE001 - a dropped request is what this test looks for
                    results.append((None, repr(e)))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(200)]
        for t in threads:
            t.start()
        wait_for(lambda: len(results) >= 200)
        d = deploy.start("pets:2", "blue-green")
        wait_for(lambda: sum(v == 2 for _, v in results) >= 200)  # switched, and still under load
        stop.set()
        for t in threads:
            t.join()
    assert all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:5]
    versions = [v for _, v in results]
    assert versions.count(1) >= 200 and versions.count(2) >= 200 and set(versions) == {1, 2}
    first_new = versions.index(2)
    assert versions[first_new:].count(1) < 200  # after the switch only requests already in flight got version 1
    assert state(d) == "promoted"
    assert deploy.deployments("pets")[0].events[-1]["message"].startswith("blue-green: pets:2 warmed beside pets:1")


def test_shadow_answers_with_production_and_compares_the_candidate(run: Path, broken: Path,
                                                                   photos: list[bytes]) -> None:
    model_registry.add(run, "pets")
    model_registry.add(broken, "pets")
    d = deploy.start("pets:2", "shadow")
    with server() as c:
        answers = [post(c, image) for image in photos[:30]]
        wait_for(lambda: deploy.stats(d, Store())["candidate"]["n"] == 30)
    assert {a["model_version"] for a in answers} == {1}  # users only ever see production
    figures = deploy.stats(d, Store())
    assert figures["production"]["n"] == 30 and figures["compared"] == 30
    assert 0 <= figures["agreement"] <= 1 and figures["candidate"]["p95_ms"] > 0
    assert state(d) == "running"  # a shadow is never promoted or rolled back on its own
    assert deploy.rollback("pets").state == "stopped" and deploy.production("pets", Store()).version == 1


def test_admin_routes_need_the_token(run: Path) -> None:
    model_registry.add(run, "pets")
    model_registry.add(run, "pets")
    with server(log_predictions=False) as c:
        assert c.get("/v1/admin/deployments").status_code == 403  # no token configured: off
    with server(log_predictions=False, admin_token="s3cret") as c:
        assert c.get("/v1/admin/deployments").status_code == 401
        assert c.get("/v1/admin/deployments", headers={"authorization": "Bearer wrong"}).status_code == 401
        auth = {"authorization": "Bearer s3cret"}
        r = c.post("/v1/admin/deploy", json={"model": "pets:2", "strategy": "canary", "percent": 25,
                                             "interval": "5m"}, headers=auth)
        assert r.status_code == 201 and r.json()["percent"] == 25 and r.json()["interval_s"] == 300
        r = c.post("/v1/admin/deploy", json={"model": "pets:2", "strategy": "canary"}, headers=auth)
        assert r.status_code == 409 and "already has a running canary" in r.json()["error"]
        assert c.post("/v1/admin/deploy", json={"strategy": "canary"}, headers=auth).status_code == 422
        listed = c.get("/v1/admin/deployments", headers=auth).json()["deployments"]
        assert listed[0]["state"] == "running" and "figures" in listed[0]
        r = c.post("/v1/admin/rollback", json={}, headers=auth)
        assert r.status_code == 200 and r.json()["state"] == "rolled_back"
        assert [v["version"] for v in c.get("/v1/admin/models", headers=auth).json()["versions"]] == [1, 2]


def test_deploy_refuses_what_cannot_be_compared(run: Path, tmp_path: Path) -> None:
    model_registry.add(run, "pets")
    with pytest.raises(FoveaError, match="already pets's production"):
        deploy.start("pets:1", "canary")
    other = tmp_path / "other"
    shutil.copytree(run, other)
    meta = read_meta(other)
    meta["classes"] = ["bee", "ant"]
    (other / "model.json").write_text(__import__("json").dumps(meta))
    model_registry.add(other, "pets")
    with pytest.raises(FoveaError, match="could not be compared"):
        deploy.start("pets:2", "canary")
    model_registry.add(run, "pets")
    with pytest.raises(FoveaError, match="unknown strategy"):
        deploy.start("pets:3", "rainbow")
    with pytest.raises(FoveaError, match="end at 100"):
        deploy.start("pets:3", "canary", steps=[10, 50])
    with pytest.raises(FoveaError, match="name the version"):
        deploy.start("pets", "canary")
    for bad, message in (({"min_agreement": "x"}, "must be a number"), ({"min_agreement": 5}, "within"),
                         ({"max_error_rate": -1}, "within"), ({"min_samples": 0}, "within"), ([1, 2], "an object")):
        with pytest.raises(FoveaError, match=message):
            deploy.start("pets:3", "canary", thresholds=bad)  # type: ignore[arg-type]
    with pytest.raises(FoveaError, match="not allowed"):
        model_registry.add(run, "pets", alias="a b")
    assert [v.version for v in model_registry.versions("pets")] == [1, 2, 3]  # the refused add registered nothing
    shutil.rmtree(model_registry.resolve("pets:3").path)
    with pytest.raises(FoveaError, match="files are gone"):
        deploy.start("pets:3", "canary")
    assert deploy.active("pets", Store()) is None


def test_the_cli_deploys_lists_and_rolls_back(run: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model_registry.add(run, "pets")
    model_registry.add(run, "pets")
    code, out, _ = run_main(["deploy", "pets:2", "--strategy", "canary", "--steps", "5,50,100", "--interval", "2m"],
                            monkeypatch, capsys)
    assert code == 0 and "5 % of requests" in out and "every 120 s" in out
    code, out, _ = run_main(["deployments", "pets", "--json"], monkeypatch, capsys)
    listed = __import__("json").loads(out)["deployments"]
    assert code == 0 and listed[0]["strategy"] == "canary" and listed[0]["figures"]["candidate"]["n"] == 0
    code, out, _ = run_main(["rollback", "pets"], monkeypatch, capsys)
    assert code == 0 and "rolled_back" in out and "production is pets:1" in out
    code, _, err = run_main(["deploy", "pets:2", "--strategy", "canary", "--interval", "soon"], monkeypatch, capsys)
    assert code != 0 and "not a duration" in err


def test_predict_can_return_a_grad_cam_overlay(run: Path, photos: list[bytes]) -> None:
    with TestClient(create_app(ServeConfig(model=str(run), log_predictions=False))) as c:
        r = c.post("/v1/predict?explain=gradcam", content=photos[0], headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        url = r.json()["overlay"]
        assert url.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert image.size == (32, 32) and image.mode == "RGB"
        assert c.post("/v1/predict?explain=astrology", content=photos[0],
                      headers={"content-type": "image/jpeg"}).status_code == 422


def test_canary_arithmetic() -> None:
    assert sum(deploy.takes_turn(n, 10) for n in range(1, 1001)) == 100
    assert sum(deploy.takes_turn(n, 33.3) for n in range(1, 1001)) == 333
    assert deploy.parse_duration("10m") == 600 and deploy.parse_duration("1.5h") == 5400 and deploy.parse_duration(45) == 45
    limits = deploy.Thresholds(min_samples=10)
    healthy = {"candidate": {"n": 50, "error_rate": 0.0, "p95_ms": 12.0, "mean_confidence": 0.9},
               "production": {"n": 50, "error_rate": 0.0, "p95_ms": 10.0, "mean_confidence": 0.9},
               "agreement": 0.95, "compared": 50}
    assert deploy.judge(healthy, limits) is None
    slow = {**healthy, "candidate": {**healthy["candidate"], "p95_ms": 40.0}}
    assert "p95 latency" in (deploy.judge(slow, limits) or "")
    failing = {**healthy, "candidate": {**healthy["candidate"], "error_rate": 0.1}}
    assert "error rate" in (deploy.judge(failing, limits) or "")
    assert deploy.judge({**healthy, "candidate": {**healthy["candidate"], "n": 5}}, limits) is None  # too few


def test_a_registry_without_a_production_alias_is_still_served(run: Path, photos: list[bytes]) -> None:
    from sqlalchemy import delete

    from fovea.store import Alias

    model_registry.add(run, "pets")
    model_registry.add(run, "pets")
    with Store().session() as s:  # as in a registry made before the first version became production
        s.execute(delete(Alias))
    with server(log_predictions=False) as c:
        assert post(c, photos[0])["model_version"] == 2  # the newest, as `fovea serve pets` always did
        time.sleep(0.3)  # a few controller ticks: they must not fail or move anything
        assert post(c, photos[0])["model_version"] == 2
    with pytest.raises(FoveaError, match="no production version"):
        deploy.start("pets:1", "canary")


def test_open_inference_protocol_follows_the_canary_and_can_pin_a_version(run: Path, photos: list[bytes]) -> None:
    model_registry.add(run, "pets")
    model_registry.add(run, "pets")
    deploy.start("pets:2", "canary", percent=50, interval_s=3600)
    body = {"inputs": [{"name": "image_files", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(photos[0]).decode()]}]}
    with server(log_predictions=False) as c:
        wait_for(lambda: c.get("/v2/models/pets").json()["versions"] == ["1", "2"])
        routed = [c.post("/v2/models/pets/infer", json=body).json()["model_version"] for _ in range(20)]
        assert routed.count("2") == 10 and routed.count("1") == 10  # the canary's exact share, as /v1/predict
        for v in ("1", "2"):
            pinned = {c.post(f"/v2/models/pets/versions/{v}/infer", json=body).json()["model_version"] for _ in range(5)}
            assert pinned == {v}
        missing = c.post("/v2/models/pets/versions/7/infer", json=body)
        assert missing.status_code == 404 and "loaded: 1, 2" in missing.json()["error"]


def test_a_candidate_that_will_not_load_is_rolled_back_not_retried_forever(run: Path, photos: list[bytes]) -> None:
    model_registry.add(run, "pets")
    model_registry.add(run, "pets")
    d = deploy.start("pets:2", "canary", percent=50, interval_s=3600)
    (Path(model_registry.resolve("pets:2").path) / "model.safetensors").write_bytes(b"not the registered weights")
    with server(log_predictions=False) as c:
        wait_for(lambda: state(d) == "rolled_back", 20)
        assert {post(c, image)["model_version"] for image in photos[:10]} == {1}
    reason = deploy.refresh(d, Store()).reason or ""
    assert "cannot be loaded" in reason and "digest mismatch" in reason
