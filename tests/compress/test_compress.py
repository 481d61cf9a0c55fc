"""fovea compress and export on a model trained on real photos: every artifact loads, and the table is true."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_subset, run_main, train_cnn

import fovea
from fovea._system import Hardware
from fovea.compress import compress, export
from fovea.compress._compress import Row, _verdict
from fovea.compress._gradcam import GRADCAM_FLAG, GradCamCheck
from fovea.compress._linear import layer_error, quantize_per_channel, quantize_state
from fovea.errors import FoveaError
from fovea.runtime import TorchModel, load_single
from fovea.runtime.int8 import dequantize_per_channel, dequantize_state

FAST = "fp16,bf16,int8-sym,int8-asym,onnx,ort-int8-minmax,ort-int8-percentile"


@pytest.fixture(scope="module")
def pets(pets_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_subset(tmp_path_factory.mktemp("compress_pets"), 100, 40, pets_root)


@pytest.fixture(scope="module")
def run(pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small cnn trained 6 epochs on real cats and dogs at 32 px (with TTA, as the default records)."""
    return train_cnn(pets, tmp_path_factory, "compress", image_size=32, epochs=6,
                     widths=(16, 32, 64, 128))


@pytest.fixture(scope="module")
def result(run: Path) -> dict:
    return compress(run, methods=FAST.split(","), seconds=0.3, rounds=1, calib=32, gradcam_images=6, progress=False)


def rows(result: dict) -> dict[str, dict]:
    return {r["method"]: r for r in result["rows"] if r["device"] == "cpu"}




# --- linear quantization: the course's formula, checked against PyTorch's own quantizer -----------------------

def test_symmetric_codes_equal_pytorchs_per_channel_quantizer() -> None:
    w = torch.randn(8, 4, 3, 3) * torch.linspace(0.01, 2, 8).view(8, 1, 1, 1)
    q, scale, zero = quantize_per_channel(w, "symmetric")
    ref = torch.quantize_per_channel(w, scale.double(), zero.long(), 0, torch.qint8).int_repr()
    assert torch.equal(q, ref.clamp(-127, 127))
    assert (zero == 0).all()
    assert torch.equal(q.flatten(1).abs().amax(1), torch.full((8,), 127, dtype=torch.int8))  # +-max -> +-127


def test_asymmetric_codes_equal_pytorchs_and_keep_zero_exact() -> None:
    w = torch.randn(6, 20) + torch.linspace(-1, 1, 6).view(6, 1)  # lopsided channels
    w[:, 0] = 0.0
    q, scale, zero = quantize_per_channel(w, "asymmetric")
    ref = torch.quantize_per_channel(w, scale.double(), zero.long(), 0, torch.qint8).int_repr()
    assert torch.equal(q, ref)
    w_hat = dequantize_per_channel(q, scale, zero)
    assert torch.equal(w_hat[:, 0], torch.zeros(6))  # a zero weight stays exactly zero
    assert ((w - w_hat).abs() <= scale.view(6, 1) / 2 + 1e-7).all()  # rounding error at most half a step
    assert (q.amin(1) == -128).all() or (q.amax(1) == 127).all()  # the grid spans the channel's range


def test_sqnr_and_state_round_trip() -> None:
    w = torch.ones(4, 4)
    e = layer_error("w", w, w + 0.1)
    assert math.isclose(e.sqnr_db, 10 * math.log10(16 / (16 * 0.01)), rel_tol=1e-6)  # 20 dB
    assert math.isclose(e.mean_abs_error, 0.1, rel_tol=1e-5)
    state = {"conv.weight": torch.randn(16, 3, 3, 3), "conv.bias": torch.randn(16), "bn.num_batches_tracked": torch.tensor(5)}
    packed, errors = quantize_state(state, "asymmetric")
    assert packed["conv.weight.__int8__"].dtype == torch.int8 and "conv.weight" not in packed
    assert [x.name for x in errors] == ["conv.weight"]
    back = dequantize_state(packed)
    assert set(back) == set(state) and torch.equal(back["conv.bias"], state["conv.bias"])
    assert torch.allclose(back["conv.weight"], state["conv.weight"], atol=float(state["conv.weight"].abs().max()) / 100)


# --- the table ---------------------------------------------------------------------------------------------------

def test_every_method_is_a_loadable_artifact_measured_in_one_table(run: Path, result: dict) -> None:
    r = rows(result)
    assert list(r) == ["fp32", *FAST.split(",")]
    for row in r.values():
        for key in ("size_bytes", "accuracy", "p50_ms", "p95_ms", "throughput"):
            assert row[key] is not None and math.isfinite(row[key]) and row[key] > 0, (row["method"], key)
        assert row["accuracy_95ci"][0] <= row["accuracy"] <= row["accuracy_95ci"][1]
        assert row["p95_ms"] >= row["p50_ms"] and row["verdict"]
    base = r["fp32"]
    assert base["size_bytes"] == (run / "model.safetensors").stat().st_size
    # int8 weights: a quarter of the size, the same decisions
    for m in ("int8-sym", "int8-asym"):
        assert r[m]["size_bytes"] <= 0.3 * base["size_bytes"]
        assert r[m]["agreement"] >= 0.95 and abs(r[m]["accuracy"] - base["accuracy"]) <= 0.05
        assert r[m]["details"]["worst_layer"]["sqnr_db"] < r[m]["details"]["median_sqnr_db"]
        assert r[m]["gradcam_rho"] > 0.9
    for m in ("fp16", "bf16"):
        assert 0.45 < r[m]["size_bytes"] / base["size_bytes"] < 0.55 and r[m]["agreement"] >= 0.97
    # ONNX: the same argmax on every test image
    parity = r["onnx"]["details"]["parity"]
    assert parity["same_argmax"] == parity["images"] == result["images"]
    assert parity["max_abs_logit_diff"] < 1e-3 and r["onnx"]["agreement"] == 1.0
    for m in ("ort-int8-minmax", "ort-int8-percentile"):
        assert r[m]["size_bytes"] < 0.35 * base["size_bytes"] and r[m]["agreement"] >= 0.85
        assert r[m]["details"]["quantized_nodes"] > 0 and r[m]["details"]["batchnorm_after"] == 0
        assert r[m]["gradcam_rho"] is None or r[m]["gradcam_rho"] > 0.5
    saved = json.loads((run / "compressed" / "compression.json").read_text())
    assert [x["method"] for x in saved["rows"]] == list(r)
    report = (run / "compressed" / "report.html").read_text()
    assert "Every method" in report and "Where each model looks" in report and "quantization error per layer" in report


def test_predict_and_evaluate_accept_every_compressed_artifact(run: Path, result: dict, pets: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    images = sorted((pets / "val" / "dog").glob("*.jpg"))[:3]
    base = load_single(run, "cpu")
    x, _, _ = base.load_images(images)
    for method in FAST.split(","):
        folder = run / "compressed" / method
        code, out, err = run_main(["predict", str(folder), *map(str, images), "--json"], monkeypatch, capsys)
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert len(lines) == 3 and all(set(p["probabilities"]) == {"cat", "dog"} for p in lines)
        m = fovea.evaluate(folder, pets / "val", progress=False)
        assert abs(m["accuracy"] - rows(result)[method]["accuracy"]) < 1e-9  # the table describes this artifact
        probs = load_single(folder, "cpu").predict_proba(x)
        assert np.allclose(probs.sum(1), 1, atol=1e-4)
    onnx = run / "compressed" / "onnx"  # the drift reference travels with the artifact; no embeddings from ORT
    code, out, err = run_main(["drift", "--model", str(onnx), "--data", str(pets / "val" / "dog"), "--json"],
                              monkeypatch, capsys)
    assert code == 0, err
    drift = json.loads(out)["drift"]
    assert {t["family"] for t in drift["tests"]} == {"image_stats", "label_shift", "confidence"}
    assert "embedding_mmd" in drift["skipped"]


def test_low_precision_runs_natively_only_where_the_hardware_does(run: Path, result: dict) -> None:
    from fovea._system import hardware

    hw = hardware()
    fp16, bf16 = (TorchModel(run / "compressed" / m, "cpu") for m in ("fp16", "bf16"))
    assert fp16.dtype == (torch.float16 if hw.fp16 else torch.float32)
    assert bf16.dtype == (torch.bfloat16 if hw.bf16 else torch.float32)
    assert rows(result)["bf16"]["native"] == bool(hw.bf16)
    if not hw.fp16:
        assert "computed in float32 on this CPU" in rows(result)["fp16"]["verdict"]


def test_verdicts_flag_accuracy_loss_other_pixels_and_missing_int8_instructions() -> None:
    base = Row("fp32", "torch", "", "cpu", "", 1000, 0.90, (0.85, 0.95), 1.0, 1.0, 1.2, 100.0)
    lossy = Row("ort-int8-minmax", "onnxruntime", "", "cpu", "", 260, 0.85, (0.8, 0.9), 0.9, 0.5, 0.6, 300.0)
    no_vnni = Hardware("old cpu", 2, 2, [], [], [], None)
    text = _verdict(lossy, base, no_vnni)
    assert "loses 5.0 accuracy points" in text and "no VNNI/AMX" in text and "recommended for" not in text
    elsewhere = Row("int8-sym", "torch", "", "cpu", "", 260, 0.90, (0.85, 0.95), 1.0, 1.0, 1.2, 100.0,
                    gradcam_rho=GRADCAM_FLAG - 0.2)
    assert "looks at different pixels" in _verdict(elsewhere, base, no_vnni)
    good = Row("ort-int8-entropy", "onnxruntime", "", "cpu", "", 260, 0.90, (0.85, 0.95), 1.0, 0.5, 0.6, 300.0)
    vnni = Hardware("new cpu", 2, 2, ["avx512_vnni"], [], [], None)
    assert "recommended for CPU serving" in _verdict(good, base, vnni)


def test_a_model_that_looks_elsewhere_gets_a_low_gradcam_correlation(run: Path, pets: Path) -> None:
    """Randomize the last stage (the one Grad-CAM reads): the maps must stop agreeing."""
    import copy

    base = TorchModel(run, "cpu")
    x, _, _ = base.load_images(sorted((pets / "val" / "cat").glob("*.jpg"))[:6])
    cams = GradCamCheck(base, x)
    same = copy.copy(base)
    same.net = copy.deepcopy(base.net)
    rho_same, _ = cams.compare("same", same)
    assert rho_same > 0.99
    other = copy.copy(base)
    other.net = copy.deepcopy(base.net)
    torch.manual_seed(0)
    stage = dict(other.net.named_modules())[cams.layer_name]
    for p in stage.parameters():
        torch.nn.init.normal_(p, std=0.2)
    rho, _ = cams.compare("other", other)
    assert rho < GRADCAM_FLAG


# --- the PT2E flow and the CLI -------------------------------------------------------------------------------------

def test_pt2e_x86_flow_writes_a_quantized_program_that_loads(run: Path, tmp_path: Path) -> None:
    r = compress(run, methods=["pt2e-x86"], out=tmp_path / "c", seconds=0.2, rounds=1, calib=32, gradcam_images=0,
                 progress=False)
    row = rows(r)["pt2e-x86"]
    assert row["details"]["quantized_activations"] > 0 and row["agreement"] >= 0.85, row
    model = fovea.load(tmp_path / "c" / "pt2e-x86", "cpu")
    assert type(model).__name__ == "ExportedModel"


def test_a_pt2_archive_with_pickled_tensors_is_refused(run: Path, tmp_path: Path) -> None:
    from fovea.artifact import PT2_FILE

    folder = tmp_path / "evil"
    folder.mkdir()
    meta = json.loads((run / "model.json").read_text())
    meta["compression"] = {"method": "pt2e-x86", "runtime": "torch.export"}
    (folder / "model.json").write_text(json.dumps(meta))
    with zipfile.ZipFile(folder / PT2_FILE, "w") as z:
        z.writestr("m/data/weights/model_weights_config.json",
                   json.dumps({"config": {"w": {"path_name": "weight_0", "use_pickle": True}}}))
    with pytest.raises(FoveaError, match="pickle"):
        fovea.load(folder, "cpu")


def test_cli_json_and_table(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["compress", str(run), "--methods", "int8-sym,onnx", "--out", str(tmp_path / "c"),
                               "--seconds", "0.2", "--rounds", "1", "--gradcam-images", "0", "--json"], monkeypatch, capsys)
    assert code == 0, err
    obj = json.loads(out)
    assert [r["method"] for r in obj["rows"]] == ["fp32", "int8-sym", "onnx"]
    assert {"method", "size_bytes", "accuracy", "p50_ms", "p95_ms", "throughput"} <= set(obj["rows"][0])
    code, out, err = run_main(["compress", str(run), "--methods", "int8-asym", "--out", str(tmp_path / "d"),
                               "--seconds", "0.2", "--rounds", "1", "--gradcam-images", "0"], monkeypatch, capsys)
    assert code == 0, err
    assert "int8-asym" in out and "machine:" in out and "report:" in out


@pytest.mark.parametrize("args, message", [
    (["--methods", "int4"], "unknown method"),
    (["--data", "/nonexistent/place"], "does not exist"),
])
def test_cli_errors_are_one_line_exit_2(run: Path, args: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["compress", str(run), *args], monkeypatch, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_compressing_a_compressed_model_or_a_run_without_its_data_is_explained(run: Path, result: dict,
                                                                                tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="already compressed"):
        compress(run / "compressed" / "int8-sym", progress=False)
    moved = tmp_path / "moved"
    moved.mkdir()
    meta = json.loads((run / "model.json").read_text())
    meta["data"]["root"] = str(tmp_path / "gone")
    (moved / "model.json").write_text(json.dumps(meta))
    (moved / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    with pytest.raises(FoveaError, match="--data"):
        compress(moved, methods=["int8-sym"], progress=False)


# --- export ----------------------------------------------------------------------------------------------------------

def test_export_onnx_for_triton_matches_pytorch(run: Path, tmp_path: Path, pets: Path) -> None:
    info = export(run, "onnx", tmp_path / "onnx")
    assert info["parity"]["same_argmax"] == info["parity"]["images"]
    config = (Path(info["triton_repository"]) / run.name / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "TYPE_UINT8" in config and "dims: [ 2 ]" in config
    images = sorted((pets / "val" / "cat").glob("*.jpg"))[:5]
    a, _ = load_single(run, "cpu").predict(images)
    b, _ = fovea.load(tmp_path / "onnx", "cpu").predict(images)
    assert [p.label for p in a] == [p.label for p in b]
    assert max(abs(p.probability - q.probability) for p, q in zip(a, b)) < 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_export_torchscript_and_safetensors(run: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    base = load_single(run, "cpu")
    x = torch.randint(0, 256, (4, 3, base.image_size, base.image_size), dtype=torch.uint8)
    info = export(run, "torchscript", tmp_path / "ts")
    scripted = torch.jit.load(info["file"])
    with torch.no_grad():
        assert torch.allclose(scripted(x), base.forward(x), atol=1e-4)
    assert json.loads((tmp_path / "ts" / "fovea.json").read_text())["classes"] == ["cat", "dog"]
    info = export(run, "safetensors", tmp_path / "st")
    with safe_open(info["file"], "pt") as f:
        assert json.loads(f.metadata()["classes"]) == ["cat", "dog"]
    assert torch.allclose(load_single(tmp_path / "st", "cpu").forward(x), base.forward(x))


def test_export_errors(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["export", str(run), "--format", "tflite"], monkeypatch, capsys)
    assert code == 2 and "unknown format" in err
    code, _, err = run_main(["export", str(tmp_path), "--format", "onnx"], monkeypatch, capsys)
    assert code == 2 and "not a Fovea model" in err


def test_entropy_and_percentile_calibrations_differ_from_minmax(run: Path, tmp_path: Path) -> None:
    """ONNX Runtime's default entropy histogram (128 bins for 128 levels) makes entropy equal MinMax."""
    import onnx
    from onnx import numpy_helper

    from fovea.compress._onnx import export_onnx, quantize_ort

    base = TorchModel(run, "cpu")
    fp32 = export_onnx(base.net, base.mean, base.std, base.image_size, tmp_path / "fp32.onnx")
    calib = torch.randint(0, 256, (32, 3, base.image_size, base.image_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))

    def activation_scales(method: str) -> dict[str, float]:
        out = tmp_path / f"{method}.onnx"
        quantize_ort(fp32, out, calib, method, work=tmp_path)
        g = onnx.load(str(out)).graph
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        return {n.input[1]: float(inits[n.input[1]]) for n in g.node
                if n.op_type == "QuantizeLinear" and inits.get(n.input[1], np.zeros(2)).size == 1}

    minmax, entropy, percentile = (activation_scales(m) for m in ("minmax", "entropy", "percentile"))
    assert minmax.keys() == entropy.keys() and len(minmax) > 3
    assert sum(entropy[k] < minmax[k] * 0.99 for k in minmax) >= 2  # entropy clips some ranges
    assert any(abs(percentile[k] - minmax[k]) > 1e-6 * minmax[k] for k in minmax)


def test_a_method_that_fails_is_a_row_saying_why_and_the_others_still_count(run: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import fovea.compress._compress as c

    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("Unsupported: aten::weird_op")

    monkeypatch.setattr(c, "export_onnx", broken)
    r = compress(run, methods=["onnx", "int8-sym"], out=tmp_path / "c", seconds=0.2, rounds=1, gradcam_images=0,
                 progress=False)
    onnx, int8 = rows(r)["onnx"], rows(r)["int8-sym"]
    assert onnx["verdict"].startswith("failed: RuntimeError: Unsupported: aten::weird_op")
    assert onnx["accuracy"] is None and onnx["throughput"] is None and not (tmp_path / "c" / "onnx").exists()
    assert int8["throughput"] > 0
    def no_nan(constant: str) -> None:
        pytest.fail(f"{constant} in compression.json: not JSON")

    json.loads((tmp_path / "c" / "compression.json").read_text(), parse_constant=no_nan)
