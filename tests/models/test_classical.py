"""Classical models (hog-svm, colorhist-nb, ...): features, heads equal to scikit-learn's, and the whole life of one
through train, predict, evaluate, batch, serve, explain and compress, with no pickle in its artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main

import fovea
from fovea.errors import FoveaError
from fovea.models import create_model, default_config, list_models, summarize
from fovea.models._classical import CLASSIFIERS, FEATURES, GaussianNBHead, KNNHead
from fovea.training._classical import fit_arrays, two_class

CLASSICAL = [n for n in list_models("fovea") if default_config(n).get("kind") == "classical"]


def test_every_feature_and_classifier_is_a_registered_model() -> None:
    assert sorted(CLASSICAL) == sorted(f"{f}-{c}" for f in FEATURES for c in CLASSIFIERS)
    assert default_config("hog-svm")["mean"] == (0.0, 0.0, 0.0)  # the model turns its input back into pixels


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_features_have_their_declared_length_and_take_real_pixels(name: str) -> None:
    from skimage.data import chelsea  # a real photo of a cat

    rgb = np.ascontiguousarray(chelsea()[:64, 100:164])
    f = FEATURES[name]
    v = f.fn(rgb)
    assert v.shape == (f.dim(64),) and v.dtype == np.float32 and np.isfinite(v).all()
    assert f.flops(64) > 64 * 64  # at least a few operations per pixel
    if name == "colorhist":
        assert v.sum() == pytest.approx(1.0)  # shares of the pixels


def test_hog_is_scikit_images_hog() -> None:
    from skimage.feature import hog

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    gray = (rgb @ [0.299, 0.587, 0.114]).round().astype(np.uint8)
    ours = FEATURES["hog"].fn(rgb)
    theirs = hog(gray, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2), block_norm="L2-Hys")
    assert ours.shape == (1764,)
    assert np.abs(ours - theirs).max() < 0.05  # OpenCV's gray rounds a little differently from this luma


@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_heads_predict_as_the_fitted_estimator(n_classes: int) -> None:
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    x, y = make_classification(300, 20, n_informative=8, n_classes=n_classes, random_state=0)
    z = x.astype(np.float32)
    arrays, chosen = fit_arrays("logreg", z, y, n_classes, c=1.0, k=None, balanced=False, seed=0)
    logits = z @ arrays["weight"].T + arrays["bias"]
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(z, y)
    assert np.allclose(torch.from_numpy(logits).softmax(1).numpy(), ref.predict_proba(z), atol=1e-4)
    arrays, chosen = fit_arrays("svm", z, y, n_classes, c=None, k=None, balanced=False, seed=0)
    assert chosen["c"] in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1) and 0 < chosen["cv_accuracy"] <= 1
    p = torch.from_numpy(z @ arrays["weight"].T + arrays["bias"]).softmax(1).numpy()
    assert (p.argmax(1) == y).mean() > 0.75  # Platt-scaled, still the SVM's decisions on separable-ish data


def test_two_class_logits_give_the_sigmoid() -> None:
    w, b = np.array([[1.0, -2.0]]), np.array([0.5])
    x = np.array([[0.3, 0.1], [-1.0, 2.0]])
    w2, b2 = two_class(w, b)
    p = torch.from_numpy(x @ w2.T + b2).softmax(1)[:, 1].numpy()
    assert np.allclose(p, 1 / (1 + np.exp(-(x @ w.T + b).ravel())))


def test_gaussian_nb_head_is_sklearns_joint_log_likelihood() -> None:
    from sklearn.naive_bayes import GaussianNB

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(int)
    nb = GaussianNB().fit(x, y)
    head = GaussianNBHead(6, 2)
    head.load_state_dict({"theta": torch.tensor(nb.theta_).float(), "var": torch.tensor(nb.var_).float(),
                          "log_prior": torch.tensor(np.log(nb.class_prior_)).float()})
    got = head(torch.from_numpy(x)).double().log_softmax(1).numpy()
    assert np.allclose(got, nb.predict_log_proba(x), atol=1e-4)


def test_knn_head_is_sklearns_vote() -> None:
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(1)
    x, q = rng.normal(size=(120, 5)).astype(np.float32), rng.normal(size=(30, 5)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    head = KNNHead(5, 3, 120, k=7)
    head.load_state_dict({"stored": torch.from_numpy(x), "votes": torch.eye(3)[torch.from_numpy(y)]})
    share = head(torch.from_numpy(q)).exp().numpy()
    ref = KNeighborsClassifier(7).fit(x, y).predict_proba(q)
    assert np.allclose(np.where(ref > 0, share, 0), ref, atol=1e-6)


def test_summary_counts_the_fitted_arrays_and_estimates_the_features() -> None:
    s = summarize("hog-svm")
    dim = FEATURES["hog"].dim(64)
    assert s.parameters == 2 * dim + (dim * 2 + 2)  # mu, sigma, and the linear head
    assert s.trainable_parameters == 0  # fitted, not trained by gradient
    assert s.uncounted_flops == FEATURES["hog"].flops(64) and s.flops > s.uncounted_flops  # + the head's product
    assert "handcrafted" in s.notes


def test_bad_options_are_clear() -> None:
    with pytest.raises(FoveaError, match="k .nearest neighbours"):
        create_model("hog-knn", 2, image_size=64, k=0)
    with pytest.raises(FoveaError, match="does not take"):
        create_model("hog-svm", 2, image_size=64, drop_rate=0.3)  # --dropout has no meaning here


# --------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def hog_svm(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FOVEA_HOME", str(tmp_path_factory.mktemp("classical_home")))
        return fovea.train(tiny_pets, model="hog-svm", out=str(tmp_path_factory.mktemp("classical") / "run"),
                           progress=False)


def test_hog_svm_trains_into_an_ordinary_artifact(hog_svm: Path) -> None:
    meta = json.loads((hog_svm / "model.json").read_text())
    metrics = json.loads((hog_svm / "metrics.json").read_text())
    assert meta["architecture"]["name"] == "hog-svm" and "c" in meta["architecture"]["kwargs"]
    assert meta["transfer"]["classical"]["feature"] == "hog" and metrics["epochs_run"] == 1
    assert metrics["accuracy"] > 0.55 and metrics["roc_auc"] is not None  # 40 images a class: above chance
    assert meta["unknown"]["score"] == "knn"
    assert (hog_svm / "reference.npz").exists() and (hog_svm / "history.csv").read_text().count("\n") == 2
    report = (hog_svm / "report.html").read_text()
    assert "Classical model" in report and "does not apply" in report  # no Grad-CAM, and it says why


def test_hog_svm_artifact_holds_no_pickle(hog_svm: Path) -> None:
    from safetensors.torch import load_file

    for p in (f for f in hog_svm.rglob("*") if f.is_file()):
        head = p.read_bytes()[:9]
        if p.name == "reference.npz":
            np.load(p, allow_pickle=False)["probabilities"]
            continue
        if p.suffix == ".safetensors":  # an 8-byte header length (its first byte may be 0x80), then JSON
            assert head[8:9] == b"{" and load_file(str(p)), f"{p} is not safetensors"
            continue
        assert not head.startswith(b"\x80") and head[:4] != b"PK\x03\x04", f"{p} looks like a pickle"
    tensors = load_file(str(hog_svm / "model.safetensors"))
    assert {"mu", "sigma", "head.weight", "head.bias"} <= set(tensors)


def test_hog_svm_predicts_evaluates_and_batches_as_loaded(hog_svm: Path, tiny_pets: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from fovea.batch import run_batch

    photos = sorted((tiny_pets / "val" / "dog").glob("*.jpg"))[:4]
    model = fovea.load(hog_svm, "cpu")
    preds, bad = model.predict(photos)
    assert not bad and len(preds) == 4 and all(abs(sum(p.probabilities.values()) - 1) < 1e-5 for p in preds)
    again = fovea.load(hog_svm, "cpu").predict(photos)[0]
    assert [p.probabilities for p in again] == [p.probabilities for p in preds]  # deterministic features
    code, out, err = run_main(["evaluate", str(hog_svm), str(tiny_pets / "val"), "--json"], monkeypatch, capsys)
    assert code == 0, err
    evaluated = json.loads(out)
    trained = json.loads((hog_svm / "metrics.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"])
    r = run_batch(str(hog_svm), tiny_pets / "val", db=f"sqlite:///{tmp_path / 'b.db'}", progress=False)
    assert r.predicted == 40


NETWORK_ONLY = ("dropout", "--epochs", "--augment", "--patience", "bigger model")  # knobs a one-pass fit lacks


def test_hog_svm_is_advised_on_its_own_knobs(hog_svm: Path) -> None:
    # What training wrote (metrics.json, which `fovea train` prints, and the report): C and the features, none
    # of a network's knobs.
    d = json.loads((hog_svm / "metrics.json").read_text())["diagnosis"]
    assert d["verdict"] in ("bias", "variance"), d  # 40 images a class: far from a fit
    report = (hog_svm / "report.html").read_text()
    section = report.split("<h2>Diagnosis:", 1)[1].split("<h2>", 1)[0]
    wanted = "--model combo-svm" if d["verdict"] == "bias" else "more training data"  # more features, or more images
    for advice in ("\n".join(d["next_steps"]), section):
        assert "--arch c=" in advice and wanted in advice, advice
        assert not [k for k in NETWORK_ONLY if k in advice], advice


def test_evaluate_advises_a_classical_models_own_knobs(hog_svm: Path, tiny_pets: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["evaluate", str(hog_svm), str(tiny_pets / "val")], monkeypatch, capsys)
    assert code == 0, err
    printed = "\n".join(line for line in out.splitlines() if line.strip().startswith("next:"))
    assert "--arch c=" in printed, out
    assert not [k for k in NETWORK_ONLY if k in printed], out


def test_train_prints_k_nn_advice(tiny_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["train", str(tiny_pets), "--model", "lbp-knn", "--out", str(tmp_path / "knn"),
                               "--unknown-keep", "0", "-q"], monkeypatch, capsys)
    assert code == 0, err
    printed = "\n".join(line for line in out.splitlines() if line.strip().startswith("next:"))
    assert "diagnosis: VARIANCE" in out, out  # k-NN counts each training image among its own neighbours
    assert "--arch k=" in printed and "more training data" in printed, out
    assert not [k for k in NETWORK_ONLY if k in printed], out


def test_hog_svm_is_served(hog_svm: Path, tiny_pets: Path) -> None:
    from fastapi.testclient import TestClient

    from fovea.serve import ServeConfig, create_app

    photo = sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[0]
    expected = fovea.load(hog_svm, "cpu").predict([photo])[0][0]
    with TestClient(create_app(ServeConfig(model=str(hog_svm), log_predictions=False))) as c:
        r = c.post("/v1/predict", content=photo.read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        assert r.json()["label"] == expected.label and r.json()["model"] == hog_svm.name
        assert abs(r.json()["probability"] - expected.probability) < 1e-5


def test_explain_says_it_does_not_apply(hog_svm: Path, tiny_pets: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    photo = sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[0]
    code, _, err = run_main(["explain", str(hog_svm), str(photo)], monkeypatch, capsys)
    assert code == 2 and "does not apply" in err and "handcrafted" in err


def test_compress_keeps_weight_formats_and_refuses_export_clearly(hog_svm: Path, tiny_pets: Path,
                                                                  tmp_path: Path) -> None:
    from fovea.compress import compress

    result = compress(hog_svm, methods=["int8-sym", "onnx"], data=tiny_pets / "val", out=tmp_path / "c",
                      seconds=0.2, rounds=1, gradcam_images=2, progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["int8-sym"]["accuracy"] == pytest.approx(rows["fp32"]["accuracy"], abs=0.05)
    assert "does not apply" in rows["onnx"]["verdict"] and "ONNX" in rows["onnx"]["verdict"]


@pytest.mark.parametrize("name", ["colorhist-nb", "lbp-knn", "combo-logreg"])
def test_other_classical_models_train_and_load(name: str, tiny_pets: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, model=name, out=str(tmp_path / name), progress=False, unknown_keep=0.0)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.4 <= metrics["accuracy"] <= 1 and np.isfinite(metrics["log_loss"])
    p = fovea.load(run, "cpu").predict_proba(fovea.load(run, "cpu").load_images(
        sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[:2])[0])
    assert p.shape == (2, 2) and np.allclose(p.sum(1), 1, atol=1e-5)


def test_lr_find_refuses_a_classical_model(tiny_pets: Path) -> None:
    from fovea.training import lr_find

    with pytest.raises(FoveaError, match="no learning rate"):
        lr_find(tiny_pets, model="hog-svm", progress=False)


@pytest.mark.parametrize("classifier", ["svm", "logreg", "knn"])
def test_a_class_with_one_training_image_is_fitted_without_cross_validation(classifier: str) -> None:
    """Nothing to cross-validate on: the grid's middle value is used, and the fit separates the two groups."""
    rng = np.random.default_rng(0)
    z = np.vstack([rng.normal(-2, 0.3, (9, 4)), [[2.0, 2.0, 2.0, 2.0]]])
    y = np.array([0] * 9 + [1])
    arrays, chosen = fit_arrays(classifier, z, y, 2, c=None, k=None, balanced=True, seed=0)
    assert arrays and "cv_accuracy" not in chosen
