"""fovea.train end to end on real photos: the run folder, reproducibility, resume, bad files, errors."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_subset
from PIL import Image
from safetensors.torch import load_file

import fovea
import fovea.training._loop as loop
from fovea.errors import FoveaError

TIMING = ("images_per_s", "seconds")
TINY: dict[str, Any] = {"model": "cnn", "image_size": 32, "progress": False}


def history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def last_checkpoint_weights(run: Path) -> dict[str, torch.Tensor]:
    pointer = json.loads((run / "checkpoint.json").read_text())
    return load_file(str(run / pointer["folder"] / "model.safetensors"))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- run folder


def test_run_folder_has_model_metrics_history_and_report(tiny_pets: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, model="cnn", image_size=32, epochs=2, out=str(tmp_path / "run"), progress=False)
    assert run == tmp_path / "run"
    for name in ("model.safetensors", "model.json", "metrics.json", "history.csv", "report.html"):
        assert (run / name).is_file(), f"{name} missing from the run folder"

    meta = json.loads((run / "model.json").read_text())
    for key in ("architecture", "classes", "preprocessing", "training", "metrics", "data", "versions"):
        assert key in meta, f"model.json lacks {key!r}"
    assert meta["architecture"]["name"] == "cnn"
    assert meta["classes"] == ["cat", "dog"]
    pre = meta["preprocessing"]
    assert pre["image_size"] == 32
    assert len(pre["mean"]) == 3 and len(pre["std"]) == 3 and all(s > 0 for s in pre["std"])
    assert pre["interpolation"] == "bilinear"
    assert meta["training"]["epochs"] == 2 and meta["training"]["model"] == "cnn"
    fp = meta["data"]["fingerprint"]
    assert isinstance(fp, str) and len(fp) >= 8 and int(fp, 16) >= 0
    assert "torch" in meta["versions"] and "python" in meta["versions"]
    assert 0.0 <= meta["metrics"]["accuracy"] <= 1.0

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_train"] == 80 and metrics["n_val"] == 40
    assert metrics["skipped"] == 0 and metrics["quarantined"] == []
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert np.asarray(metrics["confusion_matrix"]).sum() == 40
    assert metrics["epochs_run"] == 2

    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        for col in ("lr", "train_loss", "train_acc", "val_loss", "val_acc"):
            assert np.isfinite(float(r[col])), f"{col} is not a number: {r[col]!r}"

    # The report is self-contained: learning curves, confusion matrix and ROC curves as embedded PNGs.
    page = (run / "report.html").read_text()
    for section in ("Learning curves", "Confusion matrix", "ROC curves"):
        assert section in page
    pngs = [chunk.split('"', 1)[0] for chunk in page.split("data:image/png;base64,")[1:]]
    assert len(pngs) >= 3
    for b64 in pngs:
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert img.format == "PNG" and min(img.size) > 50


def test_run_folder_holds_no_pickle(tiny_pets: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, epochs=2, out=str(tmp_path / "run"), **TINY)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")]
    for p in files:
        head = p.read_bytes()[:4]
        if p.name == "reference.npz":  # a zip of .npy arrays: loads with pickles refused
            np.load(p, allow_pickle=False)["probabilities"]
            continue
        # Pickle protocol >= 2 starts with 0x80; torch.save writes a zip ("PK\x03\x04") holding a pickle.
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f"{p} looks like a pickle"
    tensors = [p for p in files if p.suffix == ".safetensors"]
    assert run / "model.safetensors" in tensors
    assert any("ckpt-" in str(p) for p in tensors), "the checkpoint should be safetensors too"
    for p in tensors:
        assert load_file(str(p)), f"{p} is empty"


def test_the_rotation_task_trains_the_network_and_stays_out_of_the_artifact(tiny_pets: Path, tmp_path: Path) -> None:
    plain = fovea.train(tiny_pets, epochs=2, out=str(tmp_path / "plain"), **TINY)
    turned = fovea.train(tiny_pets, epochs=2, rotation_aux=1.0, out=str(tmp_path / "turned"), **TINY)
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(turned / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # no rotation head in the artifact
    assert not same_tensors(a, b)  # same seed, same data: the extra loss changed the weights
    assert json.loads((turned / "train_config.json").read_text())["rotation_aux"] == 1.0
    assert fovea.load(turned, "cpu", unknown=False).predict([next(tiny_pets.glob("val/*/*"))])[0][0].label in ("cat", "dog")


def test_the_rotation_task_turns_each_image_by_a_quarter_turn_it_then_predicts() -> None:
    """Its loss is the cross-entropy of the head's guess at how far each image was turned: a head that reads
    the turn off a marked corner gets it (near 0), a head that knows nothing gets log 4."""
    from fovea.training._loop import RotationTask

    class Corner(torch.nn.Module):  # "embedding": the top-left 2 x 2 pixel of each of 4 corners' channel 0
        num_features = 4

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, -1], x[:, 0, -1, 0]], 1)

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            return x

    x = torch.zeros(64, 3, 8, 8)
    x[:, 0, 0, 0] = 1.0  # a mark in the top-left corner: rot90 by k moves it to corner k (counter-clockwise)
    task = RotationTask(Corner())
    with torch.no_grad():
        task.head.weight.copy_(20 * torch.eye(4)[[0, 3, 2, 1]])  # corner index of the mark after k turns
        task.head.bias.zero_()
    torch.manual_seed(0)
    with torch.no_grad():
        assert float(task(x)) < 1e-3
        task.head.weight.zero_()
        assert abs(float(task(x)) - float(np.log(4))) < 1e-6
    with pytest.raises(FoveaError, match="--rotation-aux needs a model with an embedding"):
        RotationTask(torch.nn.Linear(3, 2))


# ------------------------------------------------------------------------------------------ reproducible


def test_same_seed_same_run_different_seed_different_run(tiny_pets: Path, tmp_path: Path) -> None:
    kw = dict(TINY, epochs=2, batch_size=16)  # several shuffled, augmented batches per epoch
    a = fovea.train(tiny_pets, out=str(tmp_path / "a"), seed=3, **kw)
    b = fovea.train(tiny_pets, out=str(tmp_path / "b"), seed=3, **kw)
    c = fovea.train(tiny_pets, out=str(tmp_path / "c"), seed=4, **kw)

    assert without_timing(history(a)) == without_timing(history(b))
    assert same_tensors(load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors")))
    assert same_tensors(last_checkpoint_weights(a), last_checkpoint_weights(b))

    assert not same_tensors(last_checkpoint_weights(a), last_checkpoint_weights(c))
    assert not same_tensors(load_file(str(a / "model.safetensors")), load_file(str(c / "model.safetensors")))
    assert without_timing(history(a)) != without_timing(history(c))


# ----------------------------------------------------------------------------------------------- resume


class _Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(tiny_pets: Path, tmp_path: Path) -> None:
    """A 3-epoch run stopped half-way through epoch 3 and resumed ends exactly like one never stopped."""
    kw = dict(TINY, epochs=3, batch_size=16)
    straight = fovea.train(tiny_pets, out=str(tmp_path / "straight"), **kw)

    real_run_epoch = loop.run_epoch
    calls = {"n": 0}

    def run_epoch_then_crash(fit: Any, step_fn: Any) -> None:
        calls["n"] += 1
        if calls["n"] < 3:
            return real_run_epoch(fit, step_fn)
        batches = {"n": 0}

        def crashing_step(x: torch.Tensor, y: torch.Tensor) -> Any:
            batches["n"] += 1
            if batches["n"] > 2:
                raise _Interrupted
            return step_fn(x, y)

        return real_run_epoch(fit, crashing_step)

    resumed = tmp_path / "resumed"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "run_epoch", run_epoch_then_crash)
        with pytest.raises(_Interrupted):
            fovea.train(tiny_pets, out=str(resumed), **kw)
    assert json.loads((resumed / "checkpoint.json").read_text())["epoch"] == 2
    assert not (resumed / "metrics.json").exists()

    fovea.train(tiny_pets, out=str(resumed), resume=True, progress=False)
    assert [int(r["epoch"]) for r in history(resumed)] == [1, 2, 3]
    assert without_timing(history(resumed)) == without_timing(history(straight))
    assert same_tensors(last_checkpoint_weights(resumed), last_checkpoint_weights(straight))
    assert same_tensors(load_file(str(resumed / "model.safetensors")), load_file(str(straight / "model.safetensors")))


def test_extending_a_finished_run_equals_training_longer(tiny_pets: Path, tmp_path: Path) -> None:
    """2 epochs, then ``resume=True, epochs=3``, equals 3 epochs in one go.

    With a constant learning rate: the default one-cycle schedule depends on the planned length, so
    extending a one-cycle run necessarily trains epochs 1-2 on a different schedule.
    """
    kw = dict(TINY, batch_size=16, schedule="constant", lr=0.02)
    three = fovea.train(tiny_pets, out=str(tmp_path / "three"), epochs=3, **kw)
    two = fovea.train(tiny_pets, out=str(tmp_path / "two"), epochs=2, **kw)
    assert [int(r["epoch"]) for r in history(two)] == [1, 2]

    fovea.train(tiny_pets, out=str(two), resume=True, epochs=3, progress=False)
    assert [int(r["epoch"]) for r in history(two)] == [1, 2, 3]
    assert without_timing(history(two)) == without_timing(history(three))
    assert same_tensors(last_checkpoint_weights(two), last_checkpoint_weights(three))
    assert same_tensors(load_file(str(two / "model.safetensors")), load_file(str(three / "model.safetensors")))
    assert json.loads((two / "metrics.json").read_text())["epochs_run"] == 3


def test_extending_a_onecycle_run_keeps_its_history(tiny_pets: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, out=str(tmp_path / "run"), epochs=2, **TINY)
    before = without_timing(history(run))
    fovea.train(tiny_pets, out=str(run), resume=True, epochs=3, progress=False)
    after = without_timing(history(run))
    assert [int(r["epoch"]) for r in after] == [1, 2, 3]
    assert after[:2] == before
    assert json.loads((run / "model.json").read_text())["training"]["epochs"] == 3


def test_kill_9_mid_run_then_resume(pets_root: Path, tmp_path: Path) -> None:
    data = make_subset(tmp_path / "data", 150, 20, pets_root)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fovea.cli", "train", str(data), "--image-size", "32", "--epochs", "6",
           "--out", str(run), "-q", "--model", "cnn"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    pointer = run / "checkpoint.json"
    killed_at = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                epoch = json.loads(pointer.read_text())["epoch"]
            except (OSError, ValueError):
                epoch = 0
            if epoch >= 2:
                time.sleep(0.03)  # into the next epoch
                assert proc.poll() is None, "the run finished before it could be killed"
                proc.kill()  # SIGKILL: no handler, no cleanup
                killed_at = epoch
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert killed_at is not None, f"the run never reached epoch 2 (rc {proc.returncode}): {err.decode()[-2000:]}"
    assert proc.returncode == -9
    assert json.loads(pointer.read_text())["epoch"] < 6
    assert not (run / "metrics.json").exists()
    rows_before = without_timing(history(run))

    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert without_timing(rows)[: len(rows_before)] == rows_before
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 6
    assert (run / "model.safetensors").is_file() and (run / "report.html").is_file()


# -------------------------------------------------------------------------------------------- bad files


def _bad_data(root: Path, pets_root: Path) -> tuple[Path, dict[str, str]]:
    data = make_subset(root, 20, 10, pets_root)
    cat, dog = data / "train" / "cat", data / "train" / "dog"
    real = sorted(cat.glob("*.jpg"))[0].read_bytes()
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "truncated.jpg").write_bytes(real[: len(real) // 2])
    (dog / "notes.jpg").write_text("these are my notes, not a photo\n")
    Image.new("1", (20000, 20000)).save(dog / "huge.png")  # 400 MP, a few kB on disk
    rgba = np.zeros((48, 40, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(cat / "rgba.png")
    gray16 = (np.arange(48 * 40).reshape(48, 40) * 33).astype(np.uint16)
    Image.fromarray(gray16).save(dog / "gray16.png")
    assert Image.open(dog / "gray16.png").mode == "I;16"
    bad = {"empty.jpg": "empty", "truncated.jpg": "truncat", "notes.jpg": "not an image", "huge.png": "too large"}
    return data, bad


def test_bad_files_are_quarantined_and_reported(pets_root: Path, tmp_path: Path) -> None:
    data, bad = _bad_data(tmp_path / "data", pets_root)
    run = fovea.train(data, epochs=2, out=str(tmp_path / "run"), **TINY)
    metrics = json.loads((run / "metrics.json").read_text())
    q = {Path(x["path"]).name: x for x in metrics["quarantined"]}
    assert set(q) == set(bad), f"quarantined {sorted(q)}"
    for name, word in bad.items():
        assert word in q[name]["reason"].lower(), f"{name}: {q[name]['reason']!r}"
        assert q[name]["split"] == "train"
    assert metrics["skipped"] == 4
    # 20 + 20 real photos plus the RGBA and the 16-bit PNG.
    assert metrics["n_train"] == 42
    page = (run / "report.html").read_text()
    for name in bad:
        assert name in page, f"report.html does not mention {name}"
    assert "rgba.png" not in page and "gray16.png" not in page


# ----------------------------------------------------------------------------------------------- errors


def test_unknown_optimizer(tiny_pets: Path, tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="optimizer.*lion.*sgd"):
        fovea.train(tiny_pets, epochs=1, optimizer="lion", out=str(tmp_path / "run"), **TINY)
    assert not (tmp_path / "run").exists()


def test_unknown_model_suggests_a_name(tiny_pets: Path, tmp_path: Path) -> None:
    kw = dict(TINY, model="resnet1")
    with pytest.raises(FoveaError, match="Did you mean") as e:
        fovea.train(tiny_pets, epochs=1, out=str(tmp_path / "run"), **kw)
    assert "resnet1" in str(e.value) and "resnet18" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_non_empty_out_folder_without_resume(tiny_pets: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FoveaError, match="not empty"):
        fovea.train(tiny_pets, epochs=1, out=str(out), **TINY)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_resume_without_a_checkpoint(tiny_pets: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(FoveaError, match="no checkpoint"):
        fovea.train(tiny_pets, epochs=1, out=str(out), resume=True, **TINY)
    with pytest.raises(FoveaError, match="no checkpoint"):
        fovea.train(tiny_pets, epochs=1, out=str(tmp_path / "missing"), resume=True, **TINY)


def test_empty_out_folder_is_accepted(tiny_pets: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    run = fovea.train(tiny_pets, epochs=1, out=str(out), **TINY)
    assert (run / "model.safetensors").is_file()


def test_progress_bars_on_a_short_epoch(tiny_pets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bar reads running figures that appear only every 10th step; an epoch of 2 steps must still work."""
    run = fovea.train(tiny_pets, model="cnn", image_size=32, epochs=1, batch_size=32, out=str(tmp_path / "run"),
                      progress=True)
    assert (run / "model.safetensors").exists()
    assert "epoch   1/1" in capsys.readouterr().err


def test_resume_refuses_other_data_another_model_and_a_damaged_checkpoint(tiny_pets: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, epochs=1, out=str(tmp_path / "run"), **TINY)
    other = tmp_path / "other"
    shutil.copytree(tiny_pets, other)
    with pytest.raises(FoveaError, match="was trained on"):
        fovea.train(other, epochs=2, out=str(run), resume=True, **TINY)
    with pytest.raises(FoveaError, match="drop --model"):
        fovea.train(tiny_pets, epochs=2, out=str(run), resume=True, **{**TINY, "model": "mlp"})
    pointer = json.loads((run / "checkpoint.json").read_text())
    shutil.rmtree(run / pointer["folder"])
    with pytest.raises(FoveaError, match="damaged or incomplete"):
        fovea.train(tiny_pets, epochs=2, out=str(run), resume=True, **TINY)
    (run / "train_config.json").write_text('{"x": 1}')
    with pytest.raises(FoveaError, match="missing or damaged"):
        fovea.train(tiny_pets, epochs=2, out=str(run), resume=True, **TINY)


@pytest.mark.parametrize("kw,message", [({"dropout": 1.5}, "--dropout"), ({"weight_decay": -1}, "--weight-decay"),
                                        ({"patience": 0}, "--patience"), ({"image_size": 100_000}, "over 2048"),
                                        ({"rotation_aux": -0.5}, "--rotation-aux"),
                                        ({"image_size": 1, "model": "cnn"}, "too small for cnn")])
def test_bad_settings_fail_before_any_image_is_decoded(tiny_pets: Path, tmp_path: Path, kw: dict[str, Any],
                                                        message: str) -> None:
    with pytest.raises(FoveaError, match=message):
        fovea.train(tiny_pets, epochs=1, out=str(tmp_path / "run"), progress=False, **kw)
    assert not (tmp_path / "run" / "history.csv").exists()
