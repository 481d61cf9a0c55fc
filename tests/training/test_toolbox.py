"""The small-data toolbox: strong augmentation, mixup/cutmix, L1, batch norm off, class weights and the
balanced sampler, group-aware splits and folds, the bias/variance diagnosis, --seeds."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fovea
from fovea.data import Batches, augment, discover, kfold
from fovea.data._loader import color_jitter, random_erase
from fovea.errors import FoveaError
from fovea.evaluation import diagnose


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: its own process, exit code and output."""
    return subprocess.run([sys.executable, "-m", "fovea.cli", *args], capture_output=True, text=True, timeout=600,
                          env=os.environ.copy())


TINY = dict(model="cnn", epochs=2, image_size=32, batch_size=16, progress=False, extra={"widths": (8, 16, 32, 64)})


# ------------------------------------------------------------------------------------------ augmentation


def test_strong_augmentation_changes_geometry_colour_and_erases_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 24, 24)
    out = augment(x.clone(), "strong", g, (torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, x)
    # Colour jitter: one factor per image, so per-image mean brightness ratios differ across the batch.
    flat = torch.full((16, 3, 8, 8), 0.5)
    jittered = color_jitter(flat, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), torch.Generator().manual_seed(1))
    ratios = jittered.mean((1, 2, 3)) / 0.5
    assert ratios.std() > 0.05 and ((ratios > 0.65) & (ratios < 1.35)).all()
    # Random erasing: some images get one rectangle of noise, the rest are untouched.
    erased = random_erase(torch.zeros(200, 3, 16, 16), torch.Generator().manual_seed(2), p=0.5)
    touched = (erased != 0).flatten(1).any(1)
    assert 60 < int(touched.sum()) < 140
    area = (erased[touched] != 0).all(1).flatten(1).sum(1).float() / 256
    assert area.min() > 0 and area.max() <= 0.3


def test_augmentation_is_repeatable_with_the_same_seed() -> None:
    x = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(20) % 2
    runs = []
    for _ in range(2):
        b = Batches(x, y, 10, device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3, augment="strong",
                    generator=torch.Generator().manual_seed(3))
        runs.append(torch.cat([xb for xb, _ in b]))
    assert torch.equal(runs[0], runs[1])


def test_strong_policy_trains_with_mixup_and_cutmix(tiny_pets: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, out=str(tmp_path / "r"), augment="strong", **TINY)
    cfg = json.loads((run / "train_config.json").read_text())
    assert (cfg["mixup"], cfg["cutmix"]) == (0.8, 1.0)
    m = json.loads((run / "metrics.json").read_text())
    assert 0 <= m["accuracy"] <= 1 and m["epochs_run"] == 2
    with pytest.raises(FoveaError, match="even --batch-size"):
        fovea.train(tiny_pets, out=str(tmp_path / "odd"), augment="strong", **{**TINY, "batch_size": 15})


# ------------------------------------------------------------------------------- L1 and batch norm


def test_l1_penalty_shrinks_the_weights(tiny_pets: Path, tmp_path: Path) -> None:
    def mean_abs_weight(run: Path) -> float:
        net = fovea.load(run, "cpu").net
        ws = [p.abs().mean().item() for p in net.parameters() if p.ndim > 1]
        return sum(ws) / len(ws)

    kw = dict(model="mlp", image_size=8, epochs=10, batch_size=16, progress=False, monitor="last")
    plain = fovea.train(tiny_pets, out=str(tmp_path / "plain"), **kw)
    sparse = fovea.train(tiny_pets, out=str(tmp_path / "l1"), l1=0.05, **kw)
    assert mean_abs_weight(sparse) < 0.5 * mean_abs_weight(plain)
    assert json.loads((sparse / "metrics.json").read_text())["best_epoch"] == 10  # --monitor last: final weights


def test_batch_norm_can_be_turned_off_for_our_models_only(tiny_pets: Path, tmp_path: Path) -> None:
    r = cli("train", str(tiny_pets), "--model", "mlp", "--no-batch-norm", "--epochs", "1",
            "--image-size", "16", "--out", str(tmp_path / "mlp"), "-q")
    assert r.returncode == 0, r.stderr
    net = fovea.load(tmp_path / "mlp", "cpu").net
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    r = cli("train", str(tiny_pets), "--model", "resnet18", "--no-pretrained", "--no-batch-norm",
            "--epochs", "1", "--out", str(tmp_path / "rn"))
    assert r.returncode == 2 and "does not take batch_norm=False" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------- groups and folds


def _grouped_csv(tmp: Path, pets: Path, n_groups: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    files = [(p, c) for c in ("cat", "dog") for p in sorted((pets / "train" / c).glob("*.jpg"))[:150]]
    out = tmp / "labels.csv"
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        for p, c in files:
            w.writerow([str(p), c, f"patient{rng.randrange(n_groups):03d}"])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_csv_with_many_random_groups_never_puts_a_group_in_two_splits(pets_root: Path, tmp_path: Path, seed: int) -> None:
    ds = discover(_grouped_csv(tmp_path, pets_root, 80, seed), val_fraction=0.2, seed=seed)
    groups = {split: {s.group for s in ss} for split, ss in ds.splits.items()}
    assert groups["train"] and groups["val"] and not groups["train"] & groups["val"]
    assert 0.1 < len(ds.splits["val"]) / 300 < 0.3
    folds = kfold(ds, 4, seed)
    vals = [{s.group for s in f.splits["val"]} for f in folds]
    for i, f in enumerate(folds):
        assert not {s.group for s in f.splits["train"]} & vals[i]
    assert sum(len(v) for v in vals) == len(set().union(*vals)) == len(groups["train"] | groups["val"])


def test_group_regex_splits_by_file_name_and_check_flags_group_leakage(pets_root: Path, tmp_path: Path) -> None:
    # 30 "patients" with 4 photos each, named P007_2.jpg: a random split by file would put most patients in both.
    src = sorted((pets_root / "train" / "cat").glob("*.jpg"))[:60] + sorted((pets_root / "train" / "dog").glob("*.jpg"))[:60]
    flat = tmp_path / "flat"
    for i, p in enumerate(src):
        cls = "cat" if i < 60 else "dog"
        (flat / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, flat / cls / f"P{i // 4:03d}_{i % 4}.jpg")
    ds = discover(flat, 0.25, 0, group_regex=r"^(P\d+)_")
    train, val = ({s.group for s in ds.splits[k]} for k in ("train", "val"))
    assert len(train | val) == 30 and not train & val
    # A split made by the user that does mix patients: check names the groups in both.
    leaky = tmp_path / "leaky"
    for split, idx in (("train", range(0, 120, 2)), ("val", range(1, 120, 2))):
        for i in idx:
            cls = "cat" if i < 60 else "dog"
            (leaky / split / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(src[i], leaky / split / cls / f"P{i // 4:03d}_{i % 4}.jpg")
    r = cli("check", str(leaky), "--json", "--group-regex", r"^(P\d+)_")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert len(report["leakage"]["groups"]) == 30
    assert any("group" in tip for tip in report["advice"])
    r = cli("check", str(flat), "--group-regex", "(unclosed")
    assert r.returncode == 2 and "regular expression" in r.stderr


def test_folds_report_mean_and_spread(tiny_pets: Path, tmp_path: Path) -> None:
    r = cli("train", str(tiny_pets), "--folds", "3", "--epochs", "1", "--image-size", "24",
            "--arch", "widths=8,16,32,64", "--out", str(tmp_path / "cv"), "-q")
    assert r.returncode == 0, r.stderr
    cv = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert cv["k"] == 3 and len(cv["folds"]) == 3
    accs = [f["accuracy"] for f in cv["folds"]]
    assert cv["summary"]["accuracy"]["mean"] == pytest.approx(sum(accs) / 3)
    assert sum(f["n_val"] for f in cv["folds"]) == 120  # 40 train + 20 val per class, pooled, each in one fold
    assert "±" in r.stdout
    for i in (1, 2, 3):
        assert (tmp_path / "cv" / f"fold-{i}" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------- diagnosis


def test_diagnosis_follows_the_course_examples() -> None:
    # "Understanding Avoidable Bias": 8 % train, 10 % dev; human 0.5 % -> bias, human 7.2 % -> variance.
    d = diagnose(0.08, 0.10, 0.005)
    assert d["verdict"] == "bias" and d["avoidable_bias"] == pytest.approx(0.075) and d["variance"] == pytest.approx(0.02)
    assert any("bigger model" in s for s in d["next_steps"])
    d = diagnose(0.08, 0.10, 0.072)
    assert d["verdict"] == "variance" and any("more training data" in s for s in d["next_steps"])
    assert diagnose(0.06, 0.065, 0.05)["verdict"] == "fit"


def test_diagnosis_says_bias_for_a_tiny_mlp_and_variance_for_a_big_model_on_few_images(
        tiny_pets: Path, tmp_path: Path) -> None:
    tiny = fovea.train(tiny_pets, model="mlp", image_size=8, epochs=3, out=str(tmp_path / "mlp"), progress=False,
                       human_error=0.05, extra={"hidden": (2,)}, augment="standard")
    d = json.loads((tiny / "metrics.json").read_text())["diagnosis"]
    assert d["verdict"] == "bias", d
    big = fovea.train(tiny_pets, model="cnn", image_size=32, epochs=20, out=str(tmp_path / "cnn"), progress=False,
                      human_error=0.05, augment="none", label_smoothing=0.0, dropout=0.0, weight_decay=0.0,
                      monitor="last", extra={"widths": (32, 64, 128, 256)})
    d = json.loads((big / "metrics.json").read_text())["diagnosis"]
    assert d["verdict"] == "variance", d
    assert "Diagnosis: variance" in (big / "report.html").read_text()
    r = cli("evaluate", str(big), str(tiny_pets), "--human-error", "0.05")
    assert r.returncode == 0 and "VARIANCE" in r.stdout, r.stderr


# ------------------------------------------------------------------------------------------- imbalance


@pytest.fixture(scope="module")
def imbalanced_pets(tmp_path_factory: pytest.TempPathFactory, pets_root: Path) -> Path:
    """10:1 cats to dogs in train (200 : 20), balanced val (60 : 60): real photos."""
    root = tmp_path_factory.mktemp("imbalanced")
    for split, counts in (("train", {"cat": 200, "dog": 20}), ("val", {"cat": 60, "dog": 60})):
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True)
            for p in sorted((pets_root / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(p, root / split / cls / p.name)
    return root


def test_class_weights_and_balanced_sampler_raise_balanced_accuracy_on_imbalanced_data(
        imbalanced_pets: Path, tmp_path: Path) -> None:
    kw = dict(model="cnn", image_size=32, epochs=12, progress=False, extra={"widths": (16, 32, 64, 128)})
    scores = {}
    for name, extra in (("plain", {}), ("weights", {"class_weights": "auto"}), ("sampler", {"sampler": "balanced"})):
        m = json.loads((fovea.train(imbalanced_pets, out=str(tmp_path / name), **kw, **extra) / "metrics.json").read_text())
        scores[name] = (m["balanced_accuracy"], m["per_class"]["dog"]["recall"])
    plain_bacc, plain_dog = scores["plain"]
    for name in ("weights", "sampler"):
        bacc, dog = scores[name]
        assert bacc > plain_bacc + 0.03, scores
        assert dog > plain_dog, scores


def test_seeds_train_n_models_on_one_split_and_write_their_ensemble(tiny_pets: Path, tmp_path: Path) -> None:
    out = tmp_path / "ens"
    r = cli("train", str(tiny_pets), "--seeds", "2", "--epochs", "2", "--image-size", "32",
            "--arch", "widths=8,16,32,64", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert "ensemble of 2" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert [Path(x["run"]).name for x in m["members"]] == ["seed-0", "seed-1"]
    members = [fovea.load(out / f"seed-{s}", "cpu") for s in (0, 1)]
    ens = fovea.load(out, "cpu")
    images, _, _ = ens.load_images(sorted((tiny_pets / "val" / "dog").glob("*.jpg"))[:6])
    p0, p1 = (mm.predict_proba(images) for mm in members)
    assert abs(p0 - p1).max() > 1e-3  # two seeds, two different models
    assert abs(ens.predict_proba(images) - (p0 + p1) / 2).max() < 1e-5
    assert m["n_val"] == 40 and 0 <= m["accuracy"] <= 1
