"""Drift on real photos: a pets model's reference (its validation images) against windows drawn from other
pets/val images, the same images darkened, blurred or re-coloured, and cats only; through the server, the
store, feedback and `fovea drift`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_subset, run_main, train_cnn
from fastapi.testclient import TestClient
from PIL import Image, ImageEnhance, ImageFilter

import fovea
from fovea import registry
from fovea.monitor import REFERENCE, STATS, Sample, detect, load_reference, mmd_permutation_test, observe_files
from fovea.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def run(pets_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = make_subset(tmp_path_factory.mktemp("drift_pets"), 300, 100, pets_root)
    return train_cnn(data, tmp_path_factory, "drift", image_size=64, epochs=10, widths=(16, 32, 32, 32))


@pytest.fixture(scope="module")
def pool(pets_root: Path) -> dict[str, list[Path]]:
    """pets/val images the model never saw, not even as reference (its val split took the first 100 per class)."""
    return {c: sorted((pets_root / "val" / c).glob("*.jpg"))[100:] for c in ("cat", "dog")}


@pytest.fixture(scope="module")
def windows(run: Path, pool: dict[str, list[Path]]) -> list[list[Path]]:
    """20 disjoint windows of 40 images, cats and dogs mixed at random."""
    files = pool["cat"] + pool["dog"]
    order = np.random.default_rng(0).permutation(len(files))
    return [[files[i] for i in order[k * 40 : (k + 1) * 40]] for k in range(20)]


def altered(files: list[Path], out: Path, how: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in files:
        im = Image.open(f).convert("RGB")
        if how == "dark":
            im = ImageEnhance.Brightness(im).enhance(0.35)
        elif how == "blur":
            im = im.filter(ImageFilter.GaussianBlur(6))
        elif how == "recolour":
            r, g, b = im.split()
            im = Image.merge("RGB", (b, r, g))
        paths.append(out / f.name)
        im.save(paths[-1], quality=90)
    return paths


def test_training_saved_a_reference_of_the_validation_images(run: Path) -> None:
    ref = load_reference(run)
    assert (run / REFERENCE).exists() and len(ref) == 200 and ref.embeddings is not None
    head = fovea.load(run, "cpu").net.get_classifier()  # the embedding is what the classifier reads
    assert ref.embeddings.shape == (200, head.in_features) and ref.stats.shape == (200, 9)
    assert sorted(set(ref.labels)) == [0, 1]
    assert (ref.stats[:, STATS.index("width")] > 0).all()  # read from the files' headers


def test_normal_windows_pass_and_false_alarms_stay_rare(run: Path, windows: list[list[Path]]) -> None:
    model, ref = fovea.load(run, "cpu"), load_reference(run)
    results = [detect(ref, observe_files(model, w)[0], model.classes) for w in windows]
    assert results[0].p_value > 0.05 and not results[0].drift
    false_alarms = sum(r.drift for r in results)
    print(f"false alarms: {false_alarms} of 20; p-values {[round(r.p_value, 3) for r in results]}; "
          f"flagged {[r.flagged() for r in results if r.drift]}")
    assert false_alarms <= 2  # the 10 %


@pytest.mark.parametrize("how", ["dark", "blur", "recolour"])
def test_altered_images_are_flagged_on_images_and_embeddings(run: Path, windows: list[list[Path]], tmp_path: Path,
                                                             how: str) -> None:
    model, ref = fovea.load(run, "cpu"), load_reference(run)
    result = detect(ref, observe_files(model, altered(windows[0], tmp_path, how))[0], model.classes)
    flagged = result.flagged()
    print(how, result.p_value, flagged)
    assert result.drift and "image_stats" in flagged
    assert "embedding_mmd" in flagged or "embedding_ks" in flagged
    worst = result.family("image_stats").detail["worst"]  # type: ignore[union-attr]
    assert worst in {"dark": {"brightness", "contrast"}, "blur": {"sharpness"},
                     "recolour": {"red_green", "yellow_blue", "colourfulness"}}[how]


def test_a_window_of_cats_only_is_a_label_shift(run: Path, pool: dict[str, list[Path]]) -> None:
    model, ref = fovea.load(run, "cpu"), load_reference(run)
    result = detect(ref, observe_files(model, pool["cat"][:150])[0], model.classes)
    assert result.drift and "label_shift" in result.flagged()
    shares = result.family("label_shift").detail  # type: ignore[union-attr]
    assert shares["window"]["cat"] > shares["reference"]["cat"]


def test_the_permutation_test_is_calibrated_and_sensitive() -> None:
    rng = np.random.default_rng(0)
    null = [mmd_permutation_test(rng.normal(size=(80, 4)), rng.normal(size=(30, 4)), 200, seed=i)[1] for i in range(40)]
    assert np.mean(np.array(null) < 0.05) <= 0.125  # a valid test: about 5 % false positives
    _, p = mmd_permutation_test(rng.normal(size=(80, 4)), rng.normal(0.8, 1, size=(30, 4)), 500)
    assert p < 0.01


def test_without_embeddings_the_other_families_still_run(run: Path, windows: list[list[Path]]) -> None:
    model, ref = fovea.load(run, "cpu"), load_reference(run)
    window = observe_files(model, windows[1])[0]
    result = detect(Sample(ref.probabilities, ref.stats), Sample(window.probabilities, window.stats), model.classes)
    assert {t.family for t in result.tests} == {"image_stats", "label_shift", "confidence"}
    assert "embedding_mmd" in result.skipped


def test_served_traffic_feedback_and_the_drift_command(run: Path, windows: list[list[Path]], tmp_path: Path,
                                                       fovea_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    registry.add(run, "pets")
    dark = altered(windows[2], tmp_path / "dark", "dark")
    config = ServeConfig(model="pets", poll_s=0.2, drift_every_s=0.3, drift_window=40)
    with TestClient(create_app(config)) as c:
        ids = []
        for p in windows[3]:
            r = c.post("/v1/predict", content=p.read_bytes(), headers={"content-type": "image/jpeg"})
            ids.append((r.json()["request_id"], r.json()["label"]))
        time.sleep(0.5)  # the prediction log writes in the background
        for request_id, label in ids:  # every answer corrected to the other class: the model is now always wrong
            wrong = {"cat": "dog", "dog": "cat"}[label]
            r = c.post("/v1/feedback", json={"request_id": request_id, "label": wrong})
            assert r.status_code == 201 and r.json()["matched"], r.text
        assert c.post("/v1/feedback", json={"request_id": ids[0][0], "label": "horse"}).status_code == 422
        code, out, _ = run_main(["drift", "--model", "pets", "--window", "40", "--json"], monkeypatch, capsys)
        normal = json.loads(out)
        assert code == 0 and not normal["drift"]["drift"] and normal["concept"]["accuracy"] == 0.0
        assert normal["concept"]["drift"] and normal["alert"]  # concept drift: accuracy 0 % on feedback
        for p in dark:
            c.post("/v1/predict", content=p.read_bytes(), headers={"content-type": "image/jpeg"})
        time.sleep(0.5)
        report = tmp_path / "drift.html"
        code, out, _ = run_main(["drift", "--model", "pets", "--window", "40", "--report", str(report),
                                 "--fail-on-drift"], monkeypatch, capsys)
        assert code == 3 and "DRIFT" in out and "image_stats" in out and report.stat().st_size > 10_000
        deadline = time.monotonic() + 30  # the server's own periodic check sees it too
        while 'fovea_drift_alert{model_version="1"} 1.0' not in c.get("/metrics").text:
            assert time.monotonic() < deadline, "the periodic drift check never flagged the dark window"
            time.sleep(0.2)
    assert (fovea_home / "drift" / "pets" / "1" / "latest.html").exists()
    history = (fovea_home / "drift" / "pets" / "1" / "history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["alert"] is True


def test_drift_on_a_folder_and_building_a_missing_reference(run: Path, windows: list[list[Path]], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / REFERENCE).unlink()
    folder = tmp_path / "window"
    folder.mkdir()
    for p in windows[4]:
        shutil.copy(p, folder / p.name)
    code, _, err = run_main(["drift", "--model", str(old), "--data", str(folder)], monkeypatch, capsys)
    assert code != 0 and "no drift reference" in err and "--build-reference" in err
    refdir = tmp_path / "refimgs"
    for c in ("cat", "dog"):
        (refdir / c).mkdir(parents=True)
        for p in [q for q in windows[5] + windows[6] if q.parent.name == c]:  # labelled by folder
            shutil.copy(p, refdir / c / p.name)
    (tmp_path / "empty").mkdir()
    stranger = tmp_path / "birds" / "bird"
    shutil.copytree(refdir / "cat", stranger)
    for bad, message in ((tmp_path / "nowhere", "not a folder"), (tmp_path / "empty", "0 usable images"),
                         (stranger.parent, "bird are not classes")):
        code, _, err = run_main(["drift", "--model", str(old), "--build-reference", str(bad)], monkeypatch, capsys)
        assert code == 2 and message in err and not (old / REFERENCE).exists()  # nothing written
    code, out, _ = run_main(["drift", "--model", str(old), "--build-reference", str(refdir)], monkeypatch, capsys)
    assert code == 0 and "reference of 80 images saved" in out
    code, out, _ = run_main(["drift", "--model", str(old), "--data", str(folder), "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["drift"]["n_window"] == 40


def test_a_drift_alert_is_posted_to_the_webhook(run: Path, windows: list[list[Path]], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import http.server
    import threading

    received: list[dict[str, object]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the standard library's name
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_address[1]}/alerts"
    try:
        normal = tmp_path / "normal"
        normal.mkdir()
        for p in windows[8]:
            (normal / p.name).write_bytes(p.read_bytes())
        run_main(["drift", "--model", str(run), "--data", str(normal), "--webhook", url], monkeypatch, capsys)
        assert received == []  # no drift, no alert
        dark = altered(windows[8], tmp_path / "dark", "dark")
        code, _, _ = run_main(["drift", "--model", str(run), "--data", str(dark[0].parent), "--webhook", url],
                              monkeypatch, capsys)
    finally:
        hook.shutdown()
    assert code == 0 and len(received) == 1
    assert received[0]["alert"] is True and "DRIFT" in str(received[0]["text"])
