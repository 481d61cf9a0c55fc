"""The model registry, and the artifact round trip: save_model -> fovea.load -> predict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fovea
from fovea.artifact import META, WEIGHTS
from fovea.errors import FoveaError
from fovea.models import create_model, list_models, source_of
from fovea.runtime import save_model

# Every architecture below runs at 64 px (torchvision's alexnet and googlenet pool adaptively).
ARCHITECTURES = ["mlp", "cnn", "resnet18", "mobilenetv1_100", "efficientnet_b0", "alexnet", "googlenet", "vgg11"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_create_model_gives_logits_per_class(name: str) -> None:
    torch.manual_seed(0)
    net = create_model(name, num_classes=3, image_size=64).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor), f"{name} returned {type(out).__name__}, not logits"
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()


def test_mlp_is_built_for_its_image_size() -> None:
    net = create_model("mlp", num_classes=2, image_size=32).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
        with pytest.raises(RuntimeError):
            net(torch.zeros(2, 3, 64, 64))


def test_list_models_and_sources() -> None:
    names = list_models()
    for name in ("mlp", "cnn", "alexnet", "googlenet", "resnet18"):
        assert name in names
    own = list_models("fovea")
    assert {"cnn", "mlp", "rnn", "lstm", "gru", "hog-svm", "colorhist-nb", "lbp-knn", "combo-logreg"} <= set(own)
    assert own == sorted(own)
    assert list_models("torchvision") == ["alexnet", "googlenet"]
    assert "resnet18" in list_models("timm") and "cnn" not in list_models("timm")
    assert [source_of(n) for n in ("cnn", "alexnet", "resnet18")] == ["fovea", "torchvision", "timm"]


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(FoveaError, match="Did you mean") as e:
        source_of("resnet1")
    assert "resnet18" in str(e.value)
    with pytest.raises(FoveaError, match="unknown model"):
        create_model("resnet1", num_classes=2)


# ------------------------------------------------------------------------------------------- artifacts

CLASSES = ["cat", "dog", "other"]
SMALL = {"widths": [8, 16, 32]}


def _meta(name: str = "cnn", kwargs: dict[str, Any] | None = None, classes: list[str] = CLASSES,
          tta: bool = False) -> dict[str, Any]:
    return {
        "architecture": {"name": name, "kwargs": SMALL if kwargs is None else kwargs},
        "classes": classes,
        "preprocessing": {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "interpolation": "bilinear", "tta": tta},
    }


def _small_cnn(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("cnn", num_classes, image_size=32, **SMALL)


def _photos(pets_root: Path, n: int = 2) -> list[str]:
    cats = sorted((pets_root / "val" / "cat").glob("*.jpg"))[:n]
    dogs = sorted((pets_root / "val" / "dog").glob("*.jpg"))[:n]
    return [str(p) for p in cats + dogs]


@pytest.mark.parametrize("tta", [False, True])
def test_artifact_round_trip_predicts(tmp_path: Path, pets_root: Path, tta: bool) -> None:
    net = _small_cnn()
    folder = save_model(tmp_path / "model", net, _meta(tta=tta))
    assert (folder / WEIGHTS).is_file() and (folder / META).is_file()

    model = fovea.load(folder, device="cpu")
    assert model.classes == CLASSES and model.image_size == 32
    saved = net.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.net.state_dict().items())

    files = _photos(pets_root)
    preds, skipped = model.predict(files)
    assert skipped == []
    assert [p.path for p in preds] == files
    for p in preds:
        assert p.label in CLASSES
        assert set(p.probabilities) == set(CLASSES)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.probability == max(p.probabilities.values())
        assert p.probabilities[p.label] == p.probability
        assert json.loads(json.dumps(p.to_dict()))["label"] == p.label

    # The loaded model computes the saved network's function on the same preprocessed pixels.
    x, kept, _ = model.load_images(files)
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and kept == [0, 1, 2, 3]
    mean = torch.tensor(_meta()["preprocessing"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(_meta()["preprocessing"]["std"]).view(1, 3, 1, 1)
    xf = (x.float() / 255 - mean) / std
    net.eval()
    with torch.no_grad():
        expected = net(xf).softmax(1)
        if tta:
            expected = ((net(xf).log_softmax(1) + net(xf.flip(3)).log_softmax(1)) / 2).softmax(1)
    np.testing.assert_allclose(model.predict_proba(x), expected.numpy(), atol=1e-5)


def test_predict_skips_unreadable_files(tmp_path: Path, pets_root: Path) -> None:
    folder = save_model(tmp_path / "model", _small_cnn(), _meta())
    junk = tmp_path / "junk.jpg"
    junk.write_text("hello")
    files = [_photos(pets_root, 1)[0], str(junk)]
    preds, skipped = fovea.load(folder, device="cpu").predict(files)
    assert [p.path for p in preds] == [files[0]]
    assert len(skipped) == 1 and skipped[0][0] == str(junk) and skipped[0][1]


def test_save_model_requires_the_essentials(tmp_path: Path) -> None:
    meta = _meta()
    del meta["preprocessing"]
    with pytest.raises(ValueError, match="preprocessing"):
        save_model(tmp_path / "model", _small_cnn(), meta)


def test_load_folder_without_model_json(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "model", _small_cnn(), _meta())
    (folder / META).unlink()
    with pytest.raises(FoveaError, match="not a Fovea model.*model.json"):
        fovea.load(folder, device="cpu")


def test_load_model_json_of_another_format(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "model", _small_cnn(), _meta())
    meta = json.loads((folder / META).read_text())
    (folder / META).write_text(json.dumps({**meta, "format": "keras.model"}))
    with pytest.raises(FoveaError, match="format"):
        fovea.load(folder, device="cpu")
    (folder / META).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(FoveaError, match="newer"):
        fovea.load(folder, device="cpu")
    (folder / META).write_text("{not json")
    with pytest.raises(FoveaError, match="not valid JSON"):
        fovea.load(folder, device="cpu")


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("classes"), "'classes' must list"),
    (lambda m: m.update(classes=["cat", "cat", "dog"]), "names a class twice"),
    (lambda m: m.update(classes="cat"), "'classes' must list"),
    (lambda m: m.update(preprocessing=None), "no 'preprocessing'"),
    (lambda m: m["preprocessing"].update(image_size="big"), "image_size must be"),
    (lambda m: m["preprocessing"].update(image_size=-3), "image_size must be"),
    (lambda m: m["preprocessing"].update(std=[0, 0, 0]), "std must be positive"),
    (lambda m: m["preprocessing"].update(mean=[0.5]), "mean must be three numbers"),
    (lambda m: m.update(architecture="cnn"), "'architecture' must be"),
    (lambda m: m["architecture"].update(kwargs=None), "'architecture' must be"),
])
def test_an_edited_model_json_is_refused_with_its_reason(tmp_path: Path, edit: Any, message: str) -> None:
    folder = save_model(tmp_path / "model", _small_cnn(), _meta())
    meta = json.loads((folder / META).read_text())
    edit(meta)
    (folder / META).write_text(json.dumps(meta))
    with pytest.raises(FoveaError, match=message):
        fovea.load(folder, device="cpu")


def _other_weights(case: str) -> torch.nn.Module:
    if case == "resnet18":
        return create_model("resnet18", 3, image_size=32)
    if case == "mlp":
        return create_model("mlp", 3, image_size=32)
    if case == "cnn-other-widths":
        return create_model("cnn", 3, image_size=32, widths=(4, 8, 16))
    return _small_cnn(num_classes=2)  # "cnn-2-classes": a head for another class list


@pytest.mark.parametrize("case", ["resnet18", "mlp", "cnn-other-widths", "cnn-2-classes"])
def test_load_weights_of_another_architecture(tmp_path: Path, case: str) -> None:
    """model.json says cnn (widths 8-32, 3 classes), model.safetensors holds something else."""
    folder = save_model(tmp_path / "model", _other_weights(case), _meta())
    with pytest.raises(FoveaError, match="does not match"):
        fovea.load(folder, device="cpu")


def test_mlp_builds_seed_003s_digit_reader() -> None:
    """784-256-64-10 with ReLU, ReLU, sigmoid on one value per pixel of a 28 px image: the Keras model's 833,498."""
    net = create_model("mlp", 10, image_size=28, hidden=(784, 256, 64), activations=("relu", "relu", "sigmoid"),
                       gray=True, batch_norm=False, drop_rate=0.0)
    assert sum(p.numel() for p in net.parameters()) == 784 * 784 + 784 + 784 * 256 + 256 + 256 * 64 + 64 + 64 * 10 + 10
    assert isinstance(net.features[-2], torch.nn.Sigmoid)
    x = torch.rand(2, 1, 28, 28).expand(2, 3, 28, 28)  # a gray image as the decoder gives it: three equal channels
    assert net(x).shape == (2, 10)
    with pytest.raises(FoveaError, match="activations"):
        create_model("mlp", 10, image_size=28, hidden=(64,), activations=("swish",))
