"""``fovea compress RUN``: every sensible way to make a model smaller or faster, measured, in one table.

For each method: write a loadable artifact under RUN/compressed/METHOD, load it back the way predict and
serve will, and measure what a user pays and gains: top-1 accuracy on held-out images (Wilson 95 %
interval), agreement with the float32 model, file size, p50/p95 latency of one image, throughput at batch 32,
and whether Grad-CAM still points at the same pixels. Every figure comes from the loaded artifact, so the
table cannot describe a model other than the one on disk.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fovea._system import Hardware, hardware
from fovea.artifact import FORMAT, META, ONNX_FILE, PT2_FILE, REFERENCE, UNKNOWN_FILE, WEIGHTS, read_meta, write_meta
from fovea.compress._gradcam import GRADCAM_FLAG, GradCamCheck
from fovea.compress._linear import quantize_state
from fovea.compress._measure import Speed, measure
from fovea.compress._onnx import export_onnx, quantize_ort
from fovea.errors import FoveaError
from fovea.runtime import Network, TorchModel, load_single

log = logging.getLogger("fovea.compress")

# name -> (runtime, what it is). The order is the table's.
METHODS: dict[str, tuple[str, str]] = {
    "fp16": ("torch", "weights downcast to float16"),
    "bf16": ("torch", "weights downcast to bfloat16"),
    "int8-sym": ("torch", "int8 weights, linear per-channel symmetric, dequantized at load"),
    "int8-asym": ("torch", "int8 weights, linear per-channel asymmetric, dequantized at load"),
    "onnx": ("onnxruntime", "ONNX (opset 18, dynamic batch), float32, ONNX Runtime"),
    "ort-int8-minmax": ("onnxruntime", "ONNX Runtime static int8 (QDQ, per-channel), MinMax calibration"),
    "ort-int8-percentile": ("onnxruntime", "ONNX Runtime static int8 (QDQ, per-channel), percentile calibration"),
    "ort-int8-entropy": ("onnxruntime", "ONNX Runtime static int8 (QDQ, per-channel), entropy calibration"),
    "pt2e-x86": ("torch.export", "PyTorch PT2E int8, x86 Inductor quantizer, compiled by Inductor"),
}
CALIBRATED = ("ort-int8-minmax", "ort-int8-percentile", "ort-int8-entropy", "pt2e-x86")
FOLDER = "compressed"
ACCURACY_LOSS_FLAG = 0.01  # one point: the bar for "no real loss"


@dataclass
class Row:
    method: str
    runtime: str
    description: str
    device: str
    path: str
    size_bytes: int
    accuracy: float
    accuracy_95ci: tuple[float, float]
    agreement: float  # share of images with the float32 model's label
    p50_ms: float
    p95_ms: float
    throughput: float
    batch: int = 32
    native: bool | None = None  # for low precision: does this hardware compute it natively
    details: dict[str, Any] = field(default_factory=dict)
    gradcam_rho: float | None = None
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["accuracy_95ci"] = list(self.accuracy_95ci)
        return d


def _size(path: Path) -> int:
    """Bytes of the model file(s) in an artifact folder; model.json, the drift reference and the unknown score's
    state excluded (the same for all, or nearly)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name not in (META, REFERENCE, UNKNOWN_FILE))


def _carry_reference(run: Path, folder: Path) -> None:
    """The source's drift reference goes with each artifact: a compressed model sees the same validation
    images, and its image statistics and predictions are what drift checks compare (ONNX Runtime and
    torch.export expose no embeddings, so their embedding tests do not run)."""
    if (run / REFERENCE).exists():
        shutil.copy2(run / REFERENCE, folder / REFERENCE)


def _carry_unknown(run: Path, folder: Path, base: TorchModel, images: torch.Tensor) -> str | None:
    """Each artifact answers "unknown" as its source does. PyTorch weights (fp16, bf16, int8) keep the same
    network and embedding: the source's fitted score, with a threshold set on the held-out ``images`` through the
    artifact's own numerics. ONNX Runtime and torch.export expose no embedding: a score that needs one falls
    back to ``energy`` (logits only, Liu et al. 2020), calibrated the same way; returns that note."""
    from fovea.runtime import fit_unknown, recalibrate_unknown
    from fovea.runtime.unknown import SCORES, create_score

    entry = base.meta.get("unknown")
    if not entry or entry.get("score") not in SCORES:
        return None
    if read_meta(folder)["compression"]["runtime"] == "torch":
        shutil.copy2(run / UNKNOWN_FILE, folder / UNKNOWN_FILE)
        meta = read_meta(folder)
        meta["unknown"] = dict(entry)
        write_meta(folder, meta)
        recalibrate_unknown(folder, images, device="cpu")
        return None
    name = entry["score"]
    note = None
    source = create_score(name, **entry.get("params", {}))  # a combined score's needs are its parts'
    if source.uses_embedding or source.uses_stages or source.uses_images:
        name, note = "energy", f"this runtime exposes only logits: energy score instead of {entry['score']}"
        from fovea.monitor import forget_unknown_scores

        forget_unknown_scores(folder)  # the source's scores are another score's: not comparable
    fit_unknown(folder, load_single(folder, "cpu", unknown=False), fit_images=images,
                fit_labels=np.zeros(len(images), np.int64), calibration=images, score=name,
                keep=float(entry.get("keep", 0.95)), tta=bool(entry.get("tta", False)), note=note)
    return note


def _stratified(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indexes of ``n`` items drawn per class in proportion to the class sizes (at least one each)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if n >= len(labels):
        return np.arange(len(labels))
    take = np.maximum(1, np.round(counts / counts.sum() * n).astype(int))
    picked = [rng.choice(np.flatnonzero(labels == c), min(k, cnt), replace=False)
              for c, k, cnt in zip(classes, take, counts)]
    return np.sort(np.concatenate(picked))


def _training_root(meta: dict[str, Any]) -> Path | None:
    root = (meta.get("data") or {}).get("root")
    if not root:
        return None
    p = Path(root)
    return p if p.exists() else None


def _eval_images(model: TorchModel, data: Path, progress: bool) -> tuple[torch.Tensor, np.ndarray]:
    from fovea.data import eval_samples, load_images

    samples, _, _ = eval_samples(data, model.classes)
    images = load_images(samples, model.image_size, progress=progress, description="decoding test images")
    if len(images) == 0:
        raise FoveaError(f"none of the files in {data} could be read")
    return images.images, images.labels.numpy()


def _calibration_images(model: TorchModel, root: Path, n: int, seed: int, progress: bool) -> torch.Tensor:
    """A class-stratified sample of ``n`` training images, after the model's --preprocess steps."""
    from fovea.data import discover, load_images

    training = model.meta.get("training") or {}
    ds = discover(root, float(training.get("val_fraction", 0.2)), int(training.get("seed", 0)),
                  training.get("group_regex"))
    train = ds.splits.get("train", [])
    if not train:
        raise FoveaError(f"{root} has no training images to calibrate on")
    labels = np.array([s.label for s in train])
    picked = [train[i] for i in _stratified(labels, n, seed)]
    images = load_images(picked, model.image_size, progress=progress, description="decoding calibration images")
    return model.prepare(images.images)


def meta_for(source: dict[str, Any], method: str, runtime: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The source's model.json for an artifact made from it by ``method``: its metrics dropped (the artifact's
    own are measured), how it was made under "compression"; its unknown score is set after (``_carry_unknown``)."""
    meta = {k: v for k, v in source.items() if k not in ("metrics", "unknown")}
    meta["compression"] = {"method": method, "runtime": runtime, "description": METHODS[method][1], **extra}
    return meta


def _build(method: str, model: TorchModel, folder: Path, calibration: torch.Tensor | None, work: Path) -> dict[str, Any]:
    """Write the artifact of ``method`` into ``folder``; returns what the row should know about how."""
    from safetensors.torch import save_file

    runtime = METHODS[method][0]
    why = getattr(model.net, "no_export", None)  # a classical model: features outside torch
    if why and runtime != "torch":
        raise FoveaError(f"{method} does not apply to {model.meta['architecture']['name']}: {why}")
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.net.state_dict().items()}
    extra: dict[str, Any] = {}
    details: dict[str, Any] = {}
    if method in ("fp16", "bf16"):
        dtype = torch.float16 if method == "fp16" else torch.bfloat16
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                  str(folder / WEIGHTS), metadata={"format": FORMAT})
        extra["dtype"] = str(dtype).removeprefix("torch.")
    elif method in ("int8-sym", "int8-asym"):
        scheme = "symmetric" if method == "int8-sym" else "asymmetric"
        packed, errors = quantize_state(state, scheme)
        save_file({k: v.contiguous() for k, v in packed.items()}, str(folder / WEIGHTS), metadata={"format": FORMAT})
        extra.update({"scheme": scheme, "granularity": "per output channel", "quantized": len(errors)})
        details["layers"] = [e.to_dict() for e in errors]
        worst = min(errors, key=lambda e: e.sqnr_db) if errors else None
        if worst:
            details["worst_layer"] = worst.to_dict()
        details["median_sqnr_db"] = float(np.median([e.sqnr_db for e in errors])) if errors else None
    elif method == "onnx":
        export_onnx(model.net, model.mean, model.std, model.image_size, folder / ONNX_FILE)
        extra["input"] = {"name": "images", "dtype": "uint8", "shape": ["batch", 3, model.image_size, model.image_size]}
    elif method.startswith("ort-int8-"):
        fp32 = work / "fp32.onnx"
        if not fp32.exists():
            export_onnx(model.net, model.mean, model.std, model.image_size, fp32)
        assert calibration is not None
        info = quantize_ort(fp32, folder / ONNX_FILE, calibration, method.removeprefix("ort-int8-"), work=work)
        info["batchnorm_modules"] = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.net.modules())
        extra.update(info)
        details.update(info)
    elif method == "pt2e-x86":
        from fovea.compress._pt2e import quantize_pt2e

        assert calibration is not None
        info = quantize_pt2e(model.net, model.mean, model.std, model.image_size, calibration, folder / PT2_FILE)
        extra.update(info)
        details.update(info)
    else:
        raise FoveaError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    write_meta(folder, meta_for(model.meta, method, runtime, extra))
    return details


def _record_accuracy(folder: Path, row: Row, data: Path) -> None:
    """The artifact's own accuracy in its model.json (the registry and reports show it), not the source's."""
    meta = read_meta(folder)
    meta["metrics"] = {"accuracy": row.accuracy, "accuracy_95ci": list(row.accuracy_95ci),
                       "agreement_with_fp32": row.agreement, "data": str(data), "measured_by": "fovea compress"}
    write_meta(folder, meta)


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> tuple[float, tuple[float, float]]:
    from fovea.evaluation import accuracy_interval

    correct = int((pred == labels).sum())
    return correct / len(labels), accuracy_interval(correct, len(labels))


def _verdict(row: Row, base: Row, hw: Hardware, onnx: Row | None = None) -> str:
    drop = base.accuracy - row.accuracy
    size = row.size_bytes / base.size_bytes
    speed = row.throughput / base.throughput if base.throughput else 0.0
    parts = [f"{size:.2f}x size", f"{speed:.2f}x throughput", f"{-drop * 100:+.1f} points"]
    advice = []
    if drop > ACCURACY_LOSS_FLAG:
        advice.append(f"loses {drop * 100:.1f} accuracy points: not recommended")
    if row.gradcam_rho is not None and row.gradcam_rho < GRADCAM_FLAG:
        advice.append(f"looks at different pixels (Grad-CAM rho {row.gradcam_rho:.2f})")
    if row.method in ("fp16", "bf16") and row.device == "cpu" and not row.native:
        advice.append(f"{row.method} is computed in float32 on this CPU (no native {row.method}): smaller file only")
    if row.method.startswith("int8-"):
        advice.append("dequantized to float32 at load: smaller download and disk, same speed and memory as fp32")
    if (row.method.startswith("ort-int8") or row.method == "pt2e-x86") and not hw.native_int8:
        advice.append("this CPU has no VNNI/AMX int8 instructions: int8 cannot be fast here")
    if row.method.startswith("ort-int8") and onnx is not None and onnx.throughput:
        parts.append(f"{row.throughput / onnx.throughput:.2f}x float32 ONNX Runtime's throughput")
    if row.method == "onnx" and row.details.get("parity"):
        p = row.details["parity"]
        advice.append(f"same argmax as PyTorch on {p['same_argmax']}/{p['images']} images, max |logit diff| "
                      f"{p['max_abs_logit_diff']:.2e}")
    if size > 1.05:
        advice.append("a larger file than float32's")
    if not advice and drop <= ACCURACY_LOSS_FLAG and (size <= 0.55 or speed >= 1.2):
        advice.append("recommended" + (" for CPU serving" if speed >= 1.2 and row.device == "cpu" else ""))
    return "; ".join(parts + advice)


def _score_row(method: str, model: Network, images: torch.Tensor, labels: np.ndarray, base_pred: np.ndarray | None,
               *, path: Path, device: str, details: dict[str, Any]) -> Row:
    """A row with accuracy and size; speed comes later, from ``_time_rows``."""
    runtime, description = METHODS.get(method, ("torch", "float32, as trained"))
    pred = model.predict_proba(images).argmax(1)
    acc, ci = _accuracy(pred, labels)
    agreement = float((pred == base_pred).mean()) if base_pred is not None else 1.0
    nan = float("nan")
    if base_pred is None:
        details["_pred"] = pred  # the baseline's labels, for every other row's agreement
    return Row(method=method, runtime=runtime, description=description, device=device, path=str(path),
               size_bytes=_size(path), accuracy=acc, accuracy_95ci=ci, agreement=agreement, p50_ms=nan, p95_ms=nan,
               throughput=nan, details=details)


def _time_rows(timed: list[tuple[Row, Network]], seconds: float, rounds: int) -> None:
    """Latency and throughput of every row, interleaved: ``rounds`` passes over all models, medians kept.

    One model measured after another would let a slow minute of the machine (another process, thermal
    limits, a noisy neighbour in the cloud) land on whichever model was measured then; round-robin passes
    spread it over all of them, and the median discards a disturbed pass.
    """
    speeds: dict[int, list[Speed]] = {i: [] for i in range(len(timed))}
    for _ in range(rounds):
        for i, (row, model) in enumerate(timed):
            sync: Callable[[], None] | None = torch.cuda.synchronize if row.device == "cuda" else None
            speeds[i].append(measure(model.forward, model.image_size, seconds=seconds / rounds, sync=sync))
    for i, (row, _) in enumerate(timed):
        row.p50_ms = float(np.median([s.p50_ms for s in speeds[i]]))
        row.p95_ms = float(np.median([s.p95_ms for s in speeds[i]]))
        row.throughput = float(np.median([s.throughput for s in speeds[i]]))
        row.batch = speeds[i][0].batch


def compress(
    run: str | Path,
    *,
    methods: Sequence[str] | None = None,
    data: str | Path | None = None,
    calib: int = 128,
    calib_data: str | Path | None = None,
    out: str | Path | None = None,
    seconds: float = 2.0,
    rounds: int = 3,
    gradcam_images: int = 8,
    progress: bool = True,
    seed: int = 0,
    on_row: Callable[[Row], None] | None = None,
) -> dict[str, Any]:
    """Compress the model in ``run`` every way asked; returns {"rows": [...], "hardware": ..., ...}.

    Args:
        methods: names from ``METHODS`` (default: all of them). The float32 row is always measured first.
        data: held-out images for accuracy (a class tree, or the val/test split of a split layout); default
            the data set the run was trained on.
        calib: how many training images calibrate the static int8 methods (class-stratified, seeded).
        calib_data: where the training images are, when not where the run found them.
        out: where the artifacts go (default RUN/compressed); each method in its own folder.
        seconds: how long each latency and each throughput measurement of a model runs, in all.
        rounds: passes over all the models (interleaved) that those seconds are split into; medians are kept.
        gradcam_images: how many test images the Grad-CAM comparison uses (0 skips it).
    """
    run = Path(run)
    meta = read_meta(run)
    if "ensemble" in meta or meta.get("compression"):
        kind = "an ensemble" if "ensemble" in meta else f"already compressed ({meta['compression']['method']})"
        raise FoveaError(f"{run} is {kind}; compress a trained float32 model (a run folder)")
    methods = list(METHODS) if methods is None else list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FoveaError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    hw = hardware()
    base = TorchModel(run, "cpu")
    data_root = Path(data) if data is not None else _training_root(meta)
    if data_root is None:
        raise FoveaError(f"the data {run} was trained on is not found ({(meta.get('data') or {}).get('root')}); "
                         "give held-out images with --data DIR")
    images, labels = _eval_images(base, data_root, progress)
    calibration = None
    if any(m in CALIBRATED for m in methods):
        root = Path(calib_data) if calib_data is not None else _training_root(meta)
        if root is None:
            raise FoveaError("static int8 needs training images to calibrate on and the run's data is not found; "
                             "give --calib-data DIR, or leave out the calibrated methods (--methods)")
        calibration = _calibration_images(base, root, calib, seed, progress)
    out = Path(out) if out is not None else run / FOLDER
    out.mkdir(parents=True, exist_ok=True)

    rows: list[Row] = []
    base_row = _score_row("fp32", base, images, labels, None, path=run, device="cpu", details={})
    base_row.size_bytes = (run / WEIGHTS).stat().st_size
    base_row.description, base_row.runtime = "float32, as trained (PyTorch)", "torch"
    base_pred = base_row.details.pop("_pred")
    rows.append(base_row)
    timed: list[tuple[Row, Network]] = [(base_row, base)]
    sample = images[torch.from_numpy(_stratified(labels, gradcam_images, seed))] if gradcam_images > 0 else images[:0]
    cams = None
    if len(sample):
        try:
            cams = GradCamCheck(base, sample)
        except FoveaError as e:  # a model with no feature map (mlp, recurrent, classical): no Grad-CAM column
            log.info("no Grad-CAM comparison: %s", e)
    with tempfile.TemporaryDirectory(prefix="fovea-compress-") as tmp:
        for method in methods:
            folder = out / method
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            t0 = time.perf_counter()
            try:
                details = _build(method, base, folder, calibration, Path(tmp))
            except Exception as e:  # noqa: BLE001 - one method failing (an exporter or quantizer that cannot
                # handle some layer) must not cost the user the other rows; the row says what failed, and how
                shutil.rmtree(folder, ignore_errors=True)
                if not isinstance(e, FoveaError):
                    e = FoveaError(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
                log.warning("%s: not built: %s", method, e)
                rows.append(Row(method, METHODS[method][0], METHODS[method][1], "cpu", "", 0, float("nan"),
                                (float("nan"), float("nan")), float("nan"), float("nan"), float("nan"), float("nan"),
                                verdict=f"failed: {e}"))
                continue
            details["build_seconds"] = round(time.perf_counter() - t0, 2)
            _carry_reference(run, folder)
            unknown_note = _carry_unknown(run, folder, base, images)
            if unknown_note:
                details["unknown"] = unknown_note
            if cams is not None and (Path(tmp) / "fp32.onnx").exists():
                cams.reference = Path(tmp) / "fp32.onnx"
            loaded = load_single(folder, "cpu")
            if method == "onnx":
                details["parity"] = parity(base, loaded, images)
            row = _score_row(method, loaded, images, labels, base_pred, path=folder, device="cpu", details=details)
            _record_accuracy(folder, row, data_root)
            if method in ("fp16", "bf16"):
                row.native = hw.native(method.replace("fp", "float").replace("bf", "bfloat"), "cpu")
            if cams is not None:
                rho, why = cams.compare(method, loaded)
                row.gradcam_rho = rho
                if why:
                    row.details["gradcam"] = why
            rows.append(row)
            timed.append((row, loaded))
            if on_row:
                on_row(row)
        timed += _gpu_rows(run, out, methods, images, labels, base_pred)
        rows += [r for r, _ in timed if r.device == "cuda"]
        _time_rows(timed, seconds, rounds)
    gpu_base = next((r for r in rows if r.method == "fp32" and r.device == "cuda"), None)
    for r in rows:
        if not r.verdict:
            ref = gpu_base if (r.device == "cuda" and gpu_base is not None) else base_row
            onnx = next((o for o in rows if o.method == "onnx" and o.device == r.device), None)
            r.verdict = "baseline" if r is ref else _verdict(r, ref, hw, onnx)
    result = {
        "run": str(run), "data": str(data_root), "images": int(len(labels)), "classes": base.classes,
        "calibration_images": int(len(calibration)) if calibration is not None else 0,
        "hardware": hw.to_dict(), "hardware_summary": hw.summary(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": [_finite(r.to_dict()) for r in rows],
    }
    text = json.dumps(result, indent=2, default=_json_default)
    (out / "compression.json").write_text(text)
    result = json.loads(text)  # what the file says: numpy numbers as plain ones, so callers print it as JSON
    from fovea.compress._report import write_report

    result["report"] = str(write_report(out / "report.html", result, cams))
    return result


def _finite(o: Any) -> Any:
    """NaN (a failed row's figures) as None: JSON has no NaN, and a reader should see "no figure"."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not np.isfinite(o):
        return None
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def parity(base: TorchModel, onnx_model: Network, images: torch.Tensor) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on the same images: max |logit difference|, same argmax."""
    prepared = base.prepare(images)
    a, b = base.forward(prepared), onnx_model.forward(prepared)
    return {"images": int(len(images)), "max_abs_logit_diff": float((a - b).abs().max()),
            "same_argmax": int((a.argmax(1) == b.argmax(1)).sum())}


def _gpu_rows(run: Path, out: Path, methods: Sequence[str], images: torch.Tensor, labels: np.ndarray,
              base_pred: np.ndarray) -> list[tuple[Row, Network]]:
    """fp32, fp16 and bf16 on the GPU when there is one (each computed natively in its dtype)."""
    if not torch.cuda.is_available():
        return []
    rows = []
    for method, folder in [("fp32", run)] + [(m, out / m) for m in ("fp16", "bf16") if m in methods]:
        model = load_single(folder, "cuda")
        row = _score_row(method, model, images, labels, base_pred, path=folder, device="cuda", details={})
        if method == "fp32":
            row.size_bytes = (run / WEIGHTS).stat().st_size
            row.description = "float32 weights (PyTorch, bf16 autocast on the GPU)"
        else:
            row.native = True
        rows.append((row, model))
    return rows
