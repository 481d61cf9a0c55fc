"""Transfer learning: weights from files and runs, the new head, features / finetune / auto modes."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_subset
from safetensors.torch import load_file, save_file

import fovea
from fovea.cli._demo import make_digits
from fovea.data import discover, load_images
from fovea.errors import FoveaError
from fovea.models import create_model
from fovea.models.backbone import embed, fold_probe, load_weights, read_weights
from fovea.training._modes import SIMILAR_SHIFT, choose_mode, measure_shift

TINY: dict[str, Any] = {"image_size": 32, "progress": False}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory, pets_root: Path) -> Path:
    """A small cnn Fovea trained itself on real cats and dogs: the 'pretrained' weights of these tests."""
    data = make_subset(tmp_path_factory.mktemp("bb_data"), 60, 10, pets_root)
    out = tmp_path_factory.mktemp("bb") / "run"
    return fovea.train(data, model="cnn", epochs=4, batch_size=16, out=str(out), extra={"widths": (8, 16, 32, 64)},
                       **TINY)  # 30 steps: enough for BatchNorm statistics that describe the photos


def _history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------- reading weights


def test_weights_from_safetensors_pth_and_wrapped_checkpoints(tmp_path: Path) -> None:
    net = create_model("mlp", 3, image_size=8, hidden=(16,))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    for name in ("w.safetensors", "w.pth", "ddp.pt"):
        got, meta = read_weights(tmp_path / name)
        assert meta is None and got.keys() == state.keys(), name
        assert all(torch.equal(got[k], state[k]) for k in state), name


def test_a_pickle_with_code_is_refused_not_run(tmp_path: Path) -> None:
    torch.save({"model": Path("x")}, tmp_path / "evil.pth")  # any non-tensor object needs unpickling code
    with pytest.raises(FoveaError, match="refused: it holds Python objects"):
        read_weights(tmp_path / "evil.pth")


@pytest.mark.parametrize("name,content,message", [
    ("none.safetensors", None, "no such file"),
    ("w.txt", b"hello", "expected .safetensors"),
    ("broken.safetensors", b"\x00" * 40, "cannot read it"),
])
def test_unreadable_weights_are_clear_errors(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(FoveaError, match=message):
        read_weights(tmp_path / name)


def test_the_head_is_replaced_and_mismatches_are_reported(tmp_path: Path) -> None:
    source = create_model("mlp", 2, image_size=8, hidden=(32, 16, 16))
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    target = create_model("mlp", 2, image_size=8, hidden=(32, 16, 12))  # the last hidden layer differs
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_weights(target, tmp_path / "w.safetensors")
    # Same shape, but another task's classes: the head is never copied.
    assert {e.split()[0] for e in report.head_replaced} == {"head.weight", "head.bias"}
    assert torch.equal(target.state_dict()["head.weight"], before["head.weight"])
    assert any(e.startswith("features.9.weight") for e in report.mismatched)
    assert torch.equal(target.state_dict()["features.5.weight"], source.state_dict()["features.5.weight"])
    assert "of another shape" in report.summary()


def test_weights_of_another_architecture_are_an_error(tmp_path: Path) -> None:
    save_file(create_model("mlp", 2, image_size=8).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(FoveaError, match="backbone tensors"):
        load_weights(create_model("cnn", 2, image_size=32), tmp_path / "w.safetensors")


def test_modes_other_than_scratch_need_weights(tiny_pets: Path, tmp_path: Path) -> None:
    for mode in ("features", "finetune", "auto"):
        with pytest.raises(FoveaError, match="--weights"):
            fovea.train(tiny_pets, model="cnn", mode=mode, epochs=1, out=str(tmp_path / mode), **TINY)


def test_weights_run_of_another_model_is_an_error(tiny_pets: Path, backbone: Path, tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="holds a cnn, not a mlp"):
        fovea.train(tiny_pets, model="mlp", weights=str(backbone), epochs=1, out=str(tmp_path / "r"), **TINY)


# -------------------------------------------------------------------------------------------- features


def test_fold_probe_gives_the_model_the_probes_logits() -> None:
    torch.manual_seed(0)
    model = create_model("cnn", 3, image_size=32, widths=(8, 16, 32)).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        f = embed(model, x)
        mu, sigma = f.mean(0), f.std(0) + 0.1
        probe = torch.nn.Linear(f.shape[1], 3)
        fold_probe(model, probe, mu, sigma)
        assert torch.allclose(model(x), probe((f - mu) / sigma), atol=1e-4)


def test_features_mode_trains_the_head_only_and_the_artifact_predicts(
        tiny_pets: Path, backbone: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, weights=str(backbone), mode="features", epochs=5, out=str(tmp_path / "f"), **TINY)
    meta = json.loads((run / "model.json").read_text())
    assert meta["architecture"]["name"] == "cnn" and meta["architecture"]["kwargs"]["widths"] == [8, 16, 32, 64]
    t = meta["transfer"]
    assert t["mode"] == "features" and t["embedding_dim"] == 128
    assert t["weights"]["loaded"] > 0 and {e.split()[0] for e in t["weights"]["head_replaced"]} == {"head.weight", "head.bias"}
    src, new = load_file(str(backbone / "model.safetensors")), load_file(str(run / "model.safetensors"))
    for k in src:  # the backbone is untouched, BatchNorm statistics included; only the head changed
        assert torch.equal(src[k], new[k]) == (not k.startswith("head.")), k
    # The saved artifact (probe folded into the model) reproduces the run's own validation accuracy.
    metrics = json.loads((run / "metrics.json").read_text())
    assert fovea.evaluate(run, tiny_pets, progress=False)["accuracy"] == pytest.approx(metrics["accuracy"])
    assert len(_history(run)) == 5


def test_features_run_resumes_and_extends(tiny_pets: Path, backbone: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "f")
    fovea.train(tiny_pets, weights=str(backbone), mode="features", epochs=3, out=out, **TINY)
    run = fovea.train(tiny_pets, out=out, resume=True, epochs=5, progress=False)
    assert [int(r["epoch"]) for r in _history(run)] == [1, 2, 3, 4, 5]
    assert json.loads((run / "model.json").read_text())["transfer"]["mode"] == "features"


# -------------------------------------------------------------------------------------------- finetune


def test_finetune_keeps_the_frozen_share_exact_and_trains_the_rest(
        tiny_pets: Path, backbone: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, weights=str(backbone), mode="finetune", freeze=0.5, head_epochs=1, epochs=3,
                      out=str(tmp_path / "ft"), **TINY)
    t = json.loads((run / "model.json").read_text())["transfer"]
    assert t["freeze"] == 0.5 and t["head_epochs"] == 1 and t["frozen_parameters"] > 0
    src, new = load_file(str(backbone / "model.safetensors")), load_file(str(run / "model.safetensors"))
    moved = [k for k in src if not torch.equal(src[k], new[k])]
    assert not any(k.startswith(("stem.", "stages.0.", "stages.1.")) for k in moved), moved  # the frozen 24 %
    assert any(k.startswith("head.") for k in moved)
    # Two schedules: the head phase (one epoch), then a new warm-up at half the peak.
    lrs = [float(r["lr"]) for r in _history(run)]
    assert lrs[1] < lrs[0] or lrs[1] > lrs[2]


def test_two_phases_train_the_head_then_the_unfrozen_blocks() -> None:
    from types import SimpleNamespace

    from fovea.training._loop import make_optimizer
    from fovea.training._modes import Freezer, finetune_param_groups

    torch.manual_seed(0)
    model = create_model("cnn", 2, image_size=32, widths=(8, 16, 32, 64))
    groups, body, frozen_norms = finetune_param_groups(model, 0.5, 0.0)
    opt = make_optimizer("sgd", model, 0.1, 0.0, groups=groups)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == [1.0]  # one trainable block (stages.2) and the head: both at the full rate
    freezer = Freezer(model, body, frozen_norms, head_epochs=1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,))

    def step(epoch: int) -> dict[str, torch.Tensor]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        freezer.before_epoch(SimpleNamespace(epoch=epoch))  # type: ignore[arg-type]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return {k: v for k, v in model.state_dict().items() if not torch.equal(v, before[k])}

    head_phase = step(0)
    assert head_phase and all(k.startswith("head.") for k in head_phase), sorted(head_phase)
    both = step(1)
    assert any(k.startswith("stages.2.conv1.0.weight") for k in both) and "head.weight" in both
    assert not any(k.startswith(("stem.", "stages.0.", "stages.1.")) for k in both), sorted(both)


def test_finetune_without_freezing_trains_everything(tiny_pets: Path, backbone: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, weights=str(backbone), mode="finetune", freeze=0.0, head_epochs=1, epochs=2,
                      out=str(tmp_path / "ft0"), **TINY)
    last = run / json.loads((run / "checkpoint.json").read_text())["folder"] / "model.safetensors"  # epoch 2's
    src, new = load_file(str(backbone / "model.safetensors")), load_file(str(last))
    assert not torch.equal(src["stem.0.weight"], new["stem.0.weight"])


# ------------------------------------------------------------------------------------------------ auto


@pytest.mark.parametrize("n,shift,mode,freeze", [
    (200, 0.1, "features", 1.0), (5000, 0.1, "finetune", 0.7),
    (200, 0.9, "finetune", 0.4), (5000, 0.9, "finetune", 0.0), (200, None, "finetune", 0.5),
])
def test_the_course_table(n: int, shift: float | None, mode: str, freeze: float) -> None:
    got_mode, got_freeze, why = choose_mode(n, shift)
    assert (got_mode, got_freeze) == (mode, freeze)
    assert str(n) in why["why"]


def test_auto_tells_photos_of_pets_from_handwritten_digits(
        backbone: Path, pets_root: Path, fovea_home: Path, tmp_path: Path) -> None:
    model = create_model("cnn", 2, image_size=32, widths=(8, 16, 32, 64))
    load_weights(model, backbone)
    meta = json.loads((backbone / "model.json").read_text())
    mean, std = tuple(meta["preprocessing"]["mean"]), tuple(meta["preprocessing"]["std"])
    pets = discover(make_subset(tmp_path / "p", 60, 10, pets_root)).splits["val"]
    digits = discover(make_digits(tmp_path / "digits")).splits["train"][:200]
    shifts = {}
    for name, samples in (("pets", pets), ("digits", digits)):
        images = load_images(samples, 32, progress=False).images
        shifts[name] = measure_shift(model, images, mean, std, torch.device("cpu"), seed=0)
    assert shifts["pets"] < SIMILAR_SHIFT <= shifts["digits"], shifts


def test_auto_records_what_it_measured(tiny_pets: Path, backbone: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, weights=str(backbone), epochs=2, out=str(tmp_path / "a"), **TINY)
    t = json.loads((run / "model.json").read_text())["transfer"]
    assert t["auto"]["n_train"] == 80 and t["auto"]["size"] == "small" and t["auto"]["shift"] is not None
    assert t["mode"] == ("features" if t["auto"]["similar"] else "finetune")
    assert json.loads((run / "train_config.json").read_text())["mode"] == t["mode"]  # resume keeps the choice


def test_a_weights_run_passes_on_its_preprocessing_unless_told_otherwise(tiny_pets: Path, tmp_path: Path) -> None:
    gray = fovea.train(tiny_pets, model="cnn", epochs=1, preprocess="gray", out=str(tmp_path / "gray"),
                       extra={"widths": (8, 16, 32, 64)}, **TINY)
    steps = json.loads((gray / "model.json").read_text())["preprocessing"]["steps"]
    assert [s["op"] for s in steps] == ["gray"]
    child = fovea.train(tiny_pets, weights=str(gray), mode="features", out=str(tmp_path / "child"), **TINY)
    assert json.loads((child / "model.json").read_text())["preprocessing"]["steps"] == steps
    colour = fovea.train(tiny_pets, weights=str(gray), mode="features", preprocess="none", out=str(tmp_path / "c"), **TINY)
    assert json.loads((colour / "model.json").read_text())["preprocessing"]["steps"] == []
