"""Class activation maps on a real trained model, the randomization sanity check, the CLI and the report."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_subset, run_main
from torch import nn

import fovea
from fovea.errors import FoveaError
from fovea.explain import explain, find_target_layer, overlay, sanity_check
from fovea.explain._cam import class_activation_map
from fovea.explain._sanity import map_ssim, rank_correlation
from fovea.models import create_model


@pytest.fixture(scope="module")
def pets(pets_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 training and 30 validation photos per class: enough for a 32 px cnn to learn something."""
    return make_subset(tmp_path_factory.mktemp("explain_pets"), 100, 30, pets_root)


@pytest.fixture(scope="module")
def runs(pets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small cnn trained for 6 epochs on real cats and dogs at 32 px, and an mlp (no spatial map)."""
    root = tmp_path_factory.mktemp("explain_runs")
    with pytest.MonkeyPatch.context() as mp:  # the per-test FOVEA_HOME does not exist yet at module scope
        mp.setenv("FOVEA_HOME", str(tmp_path_factory.mktemp("explain_home")))
        cnn = fovea.train(pets, model="cnn", image_size=32, epochs=6, extra={"widths": (8, 16, 32, 64)},
                          out=str(root / "cnn"), progress=False)
        mlp = fovea.train(pets, model="mlp", image_size=16, epochs=1, out=str(root / "mlp"), progress=False)
    return {"cnn": cnn, "mlp": mlp}


@pytest.fixture(scope="module")
def val_images(pets: Path) -> list[Path]:
    return sorted((pets / "val" / "cat").glob("*.jpg"))[:8] + sorted((pets / "val" / "dog").glob("*.jpg"))[:8]


def sobel(net: nn.Module, x: torch.Tensor, targets: object) -> np.ndarray:
    """A model-blind "explanation": the edge strength of the input, whatever the network."""
    g = x.mean(1, keepdim=True)
    k = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device).view(1, 1, 3, 3)
    return torch.hypot(F.conv2d(g, k, padding=1), F.conv2d(g, k.transpose(2, 3), padding=1))[:, 0].cpu().numpy()




def test_gradcam_maps_on_a_trained_model(runs: dict[str, Path], val_images: list[Path]) -> None:
    model = fovea.load(runs["cnn"], "cpu")
    x, kept, _ = model.load_images(val_images)
    e = explain(model, x)
    assert e.layer == "stages" and e.method == "gradcam"
    assert e.maps.shape == (16, 32, 32) and e.maps.dtype == np.float32
    assert e.maps.min() >= 0 and e.maps.max() <= 1
    assert all(np.ptp(m) > 0.5 for m in e.maps), "a map is (nearly) constant"
    assert e.targets == e.predicted == list(model.predict_proba(x).argmax(1))
    cat, dog = explain(model, x, target="cat"), explain(model, x, target="dog")
    assert cat.targets == [0] * 16 and dog.targets == [1] * 16
    # The two classes' evidence lies in different places: the maps differ clearly, image by image.
    assert np.mean([rank_correlation(a, b) for a, b in zip(cat.maps, dog.maps)]) < 0.8
    assert np.abs(cat.maps - dog.maps).mean() > 0.1
    # Batches of 5 give the same maps as one batch of 16.
    np.testing.assert_allclose(explain(model, x, batch_size=5).maps, e.maps, atol=1e-4)
    for method in ("gradcam++", "scorecam", "eigencam", "layercam"):
        m = explain(model, x[:4], method=method).maps
        assert m.shape == (4, 32, 32) and all(np.ptp(a) > 0.5 for a in m), method


@pytest.mark.parametrize(("name", "size", "layer"), [
    ("cnn", 32, "stages"), ("resnet18", 64, "layer4"), ("efficientnet_b0", 64, "bn2"),
    # mobilenetv3 pools before its conv_head: the 1 x 1 maps after the pool are not spatial.
    # (vgg16 gives "features" too, checked by hand: its 100 M-parameter head takes 5 s to run here.)
    ("mobilenetv3_small_100", 64, "blocks"),
    # alexnet's adaptive pool only repeats its 3 x 3 map to 6 x 6: the map before it is the real one.
    ("alexnet", 128, "features"), ("googlenet", 64, "inception5b"), ("inception_v3", 107, "Mixed_7c"),
])
def test_target_layer_is_the_last_spatial_map(name: str, size: int, layer: str) -> None:
    net = create_model(name, 3, image_size=size, pretrained=False)
    assert find_target_layer(net, size) == layer
    x = torch.randn(2, 3, size, size)
    # and Grad-CAM works there, for a multiclass head
    from fovea.explain._cam import cam_maps

    maps = cam_maps(net, x, [0, 2], method="gradcam", layer=net.get_submodule(layer))
    assert maps.shape == (2, size, size)


def test_a_model_without_a_spatial_map_is_refused() -> None:
    with pytest.raises(FoveaError, match="no spatial feature map"):
        find_target_layer(create_model("mlp", 2, image_size=16), 16)


def test_cam_is_the_classifier_weighted_map_and_needs_a_gap_linear_head() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(2, 3, 8, 8)
    raw = class_activation_map(net, x, [2, 0], net[1])  # (2, 8, 8)
    acts = net[1](net[0](x))
    w = net[4].weight
    np.testing.assert_allclose(raw[0], (w[2, :, None, None] * acts[0]).sum(0).detach().numpy(), rtol=1e-5, atol=1e-6)
    # Zhou et al.'s identity: the map's mean plus the bias is the class's logit.
    logits = net(x)
    np.testing.assert_allclose(raw.mean((1, 2)) + net[4].bias.detach().numpy()[[2, 0]],
                               [logits[0, 2].item(), logits[1, 0].item()], rtol=1e-4, atol=1e-5)
    cnn = create_model("cnn", 2, image_size=32)
    with pytest.raises(FoveaError, match="global average pooling"):  # avg + max pooling and a logit scale
        class_activation_map(cnn, torch.randn(1, 3, 32, 32), [0], cnn.stages)


def test_similarity_measures_on_hand_made_maps() -> None:
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    assert rank_correlation(a, a) == pytest.approx(1)
    assert rank_correlation(a, -a) == pytest.approx(1)  # absolute: the same pixels stand out
    assert rank_correlation(a, np.zeros_like(a)) == 0  # a constant map ranks nothing
    assert rank_correlation(a, a.T) == pytest.approx(0.2, abs=0.2)
    assert map_ssim(a, a * 3 + 1) == pytest.approx(1)  # scaled to [0, 1] first
    assert map_ssim(a, np.random.default_rng(0).random((8, 8))) < 0.3


def test_sanity_check_passes_for_gradcam_and_fails_for_an_edge_map(runs: dict[str, Path], val_images: list[Path]) -> None:
    model = fovea.load(runs["cnn"], "cpu")
    x, _, _ = model.load_images(val_images)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    grad = sanity_check(model, x, "gradcam")
    edges = sanity_check(model, x, sobel)
    # head, then each conv (+ its batch norm) of the 3 stages, then the stem: 8 steps, top-down
    assert [s.randomized for s in grad.steps][:2] == ["head", "stages.2.conv2.0"] and len(grad.steps) == 8
    assert grad.steps[-1].randomized == "stem.0" and grad.midpoint == 3
    assert grad.passed and grad.decisive.spearman < 0.5
    assert grad.steps[0].spearman < 0.7 and grad.steps[0].ssim < 0.5  # a random classifier moves the maps
    assert not edges.passed
    assert all(s.spearman > 0.99 and s.ssim > 0.99 for s in edges.steps)
    # the loaded model itself is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())


def test_cli_explain_writes_overlays_and_check_exits_0(runs: dict[str, Path], val_images: list[Path], tmp_path: Path) -> None:
    folder = val_images[0].parent
    done = subprocess.run([sys.executable, "-m", "fovea.cli", "explain", str(runs["cnn"]), str(folder),
                           str(val_images[-1]), "--out", str(tmp_path / "png"), "--check", "--check-images", "8",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gradcam PASSES" in done.stdout
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 31  # the 30 cats of the folder and one dog
    from PIL import Image

    im = np.asarray(Image.open(pngs[0]))
    assert im.shape == (224, 224, 3) and im.std() > 10


def test_cli_json_and_target(runs: dict[str, Path], val_images: list[Path], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    code, out, _ = run_main(["explain", str(runs["cnn"]), *map(str, val_images[:3]), "--target", "dog", "--method",
                             "gradcam++", "--out", str(tmp_path), "--json", "--device", "cpu"], monkeypatch, capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["layer"] == "stages" and [r["explained"] for r in doc["images"]] == ["dog"] * 3
    assert all(Path(r["file"]).is_file() and r["file"].endswith(".gradcam++.png") for r in doc["images"])


def test_cli_check_exits_1_for_a_method_that_ignores_the_classifier(
        runs: dict[str, Path], val_images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    # Eigen-CAM is the first principal component of the feature map: no class, no classifier in it.
    code, out, _ = run_main(["explain", str(runs["cnn"]), *map(str, val_images), "--method", "eigencam", "--check",
                             "--out", str(tmp_path), "--json"], monkeypatch, capsys)
    check = json.loads(out)["check"]
    assert code == 1 and check["passed"] is False
    assert check["steps"][0]["randomized"] == "head" and check["steps"][0]["spearman"] > 0.99
    assert check["steps"][check["midpoint"]]["spearman"] >= 0.5


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "horse"], "unknown class 'horse'; the model's classes are: cat, dog"),
    (["--layer", "stages.9"], "no layer 'stages.9' in CNN; layers with a spatial map include: stages"),
    (["--layer", "head"], "layer 'head' gives no spatial map"),
    (["--method", "cam"], "CAM needs a head that is global average pooling + one linear layer"),
    (["--method", "saliency"], "unknown --method 'saliency'"),
])
def test_cli_errors_are_one_line_exit_2(runs: dict[str, Path], val_images: list[Path], tmp_path: Path, args: list[str],
                                        message: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["explain", str(runs["cnn"]), str(val_images[0]), "--out", str(tmp_path), *args],
                            monkeypatch, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_mlp_is_refused_by_the_cli_and_explained_away_in_its_report(runs: dict[str, Path], val_images: list[Path],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["explain", str(runs["mlp"]), str(val_images[0])], monkeypatch, capsys)
    assert code == 2 and "no spatial feature map" in err and err.count("\n") == 1
    report = (runs["mlp"] / "report.html").read_text()
    assert "What the model looks at" in report and "No heatmaps for this model: MLP has no spatial feature map" in report


def test_an_ensemble_is_refused(runs: dict[str, Path], val_images: list[Path], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from fovea.ensemble import make_ensemble

    twin = tmp_path / "twin"
    twin.mkdir()
    for name in ("model.json", "model.safetensors"):
        shutil.copy(runs["cnn"] / name, twin / name)
    ens = make_ensemble([runs["cnn"], twin], tmp_path / "ens", progress=False)
    code, _, err = run_main(["explain", str(ens), str(val_images[0])], monkeypatch, capsys)
    assert code == 2 and "is an ensemble of 2 models; explain one member at a time" in err


def _section(report: str) -> str:
    return report.split("<h2>What the model looks at</h2>")[1].split("<h2>")[0]


def test_report_shows_correct_and_top_loss_overlays(runs: dict[str, Path], pets: Path, tmp_path: Path) -> None:
    metrics = fovea.evaluate(runs["cnn"], pets, progress=False, cache=False, report=tmp_path / "eval.html")
    for report in ((runs["cnn"] / "report.html").read_text(), (tmp_path / "eval.html").read_text()):
        section = _section(report)
        correct, wrong = section.split("Most confidently wrong")
        assert correct.count("data:image/png;base64,") == 4
        assert wrong.count("data:image/png;base64,") == 4  # the model is far from perfect on 60 images
        assert re.search(r"true: (cat|dog)<br>predicted: (cat|dog) 0\.\d\d", section)
        seconds = float(re.search(r"computed in ([\d.]+) s", section).group(1))  # type: ignore[union-attr]
        assert seconds < 5
    # The wrong ones are the top losses: the 4 misclassified images with the lowest true-class probability.
    model = fovea.load(runs["cnn"], "cpu")
    files = [f for c in model.classes for f in sorted((pets / "val" / c).glob("*.jpg"))]
    labels = np.array([model.classes.index(f.parent.name) for f in files])
    probs = model.predict_proba(model.load_images(files)[0])
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    top = wrong[np.argsort(probs[wrong, labels[wrong]])[:4]]
    shown = re.findall(r"<small>(.*?)</small>", _section((tmp_path / "eval.html").read_text()).split("Most confidently")[1])
    assert shown == [files[i].name for i in top]
    assert metrics["accuracy"] == pytest.approx(1 - len(wrong) / len(files))


def test_overlay_blends_a_heatmap_at_the_image_size() -> None:
    img = np.full((40, 40, 3), 128, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[:, 4:] = 1
    out = overlay(img, heat)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    assert out[20, 35, 0] > out[20, 35, 2] and out[20, 4, 2] > out[20, 4, 0]  # red where the map is high, blue low
