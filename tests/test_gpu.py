"""GPU code paths: the cached set lives on the GPU, augmentation runs there, bf16 + channels_last train.

Skipped without CUDA; run them on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import fovea
from fovea.data import Batches, augment

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_batches_and_augmentation_stay_on_gpu() -> None:
    dev = torch.device("cuda")
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 2
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    b = Batches(images, labels, 16, device=dev, mean=(0.5,) * 3, std=(0.25,) * 3, augment="standard",
                shuffle=True, generator=g, channels_last=True)
    assert b.images.device.type == "cuda"
    xs = list(b)
    assert all(x.device.type == "cuda" and y.device.type == "cuda" for x, y in xs)
    assert xs[0][0].is_contiguous(memory_format=torch.channels_last)
    g1, g2 = torch.Generator(device=dev), torch.Generator(device=dev)
    g1.manual_seed(3)
    g2.manual_seed(3)
    x = torch.rand(8, 3, 32, 32, device=dev)
    assert torch.equal(augment(x, "standard", g1), augment(x, "standard", g2))


def test_train_on_gpu_bf16_and_load_on_cpu(tiny_pets: Path, tmp_path: Path) -> None:
    run = fovea.train(tiny_pets, model="cnn", image_size=32, epochs=3, out=str(tmp_path / "run"), progress=False)
    cfg = fovea.load(run, device="cpu").meta["training"]
    assert cfg["device"] == "auto" and cfg["amp"] is True and cfg["channels_last"] is True
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    files = sorted(str(p) for p in (tiny_pets / "val" / "cat").glob("*.jpg"))[:6]
    gpu_preds, _ = fovea.load(run, device="cuda").predict(files)
    cpu_preds, _ = fovea.load(run, device="cpu").predict(files)
    assert [p.label for p in gpu_preds] == [p.label for p in cpu_preds]
    for a, b in zip(gpu_preds, cpu_preds):
        assert abs(a.probability - b.probability) < 0.05  # bf16 on GPU vs fp32 on CPU


def test_resume_on_gpu(tiny_pets: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fovea.train(tiny_pets, model="cnn", image_size=32, epochs=2, out=str(out), progress=False)
    fovea.train(tiny_pets, out=str(out), resume=True, epochs=4, progress=False)
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_checkpoint_copy_of_gpu_tensors_is_exact() -> None:
    from fovea.training._checkpoint import _host, _tensors

    tensors = {"w": torch.randn(7, 5, device="cuda"), "h": torch.randn(3, device="cuda").half(),
               "b": torch.randn(4, 4, device="cuda").bfloat16().t(), "n": torch.tensor(12, device="cuda"),
               "m": torch.rand(6, device="cuda") > 0.5, "step": torch.tensor(3.0)}  # Adam keeps step on the host
    host = _tensors(_host(tensors))
    assert set(host) == set(tensors)
    for k, v in tensors.items():
        assert host[k].device.type == "cpu" and host[k].dtype == v.dtype and host[k].shape == v.shape, k
        assert torch.equal(host[k], v.cpu()), k


def test_explain_runs_on_the_gpu_and_agrees_with_the_cpu(tiny_pets: Path, tmp_path: Path) -> None:
    from fovea.explain import explain

    run = fovea.train(tiny_pets, model="cnn", image_size=32, epochs=2, out=str(tmp_path / "run"), progress=False)
    files = sorted((tiny_pets / "val" / "dog").glob("*.jpg"))[:4]
    maps = {}
    for dev in ("cuda", "cpu"):
        model = fovea.load(run, device=dev)
        images, _, _ = model.load_images(files)
        assert next(model.net.parameters()).device.type == dev
        maps[dev] = explain(model, images).maps
    assert maps["cuda"].shape == maps["cpu"].shape == (4, 32, 32)
    assert abs(maps["cuda"] - maps["cpu"]).max() < 0.05  # float32 on both; kernels differ slightly


def test_compress_adds_gpu_rows_with_native_half_precision(tiny_pets: Path, tmp_path: Path) -> None:
    from fovea.compress import compress

    run = fovea.train(tiny_pets, model="cnn", image_size=32, epochs=2, out=str(tmp_path / "run"), progress=False)
    r = compress(run, methods=["fp16", "bf16"], seconds=0.3, rounds=1, gradcam_images=0, progress=False)
    gpu = {x["method"]: x for x in r["rows"] if x["device"] == "cuda"}
    assert set(gpu) == {"fp32", "fp16", "bf16"}
    assert gpu["fp16"]["native"] and gpu["bf16"]["native"]
    assert all(x["throughput"] > 0 and x["agreement"] >= 0.9 for x in gpu.values())
    model = fovea.load(run / "compressed" / "bf16", "cuda")
    assert next(model.net.parameters()).dtype == torch.bfloat16  # computed in bf16, not upcast


def test_disk_batches_prefetch_onto_the_gpu(tmp_path: Path) -> None:
    """--cache disk on a GPU: rows read on a background thread into pinned memory, copied on a side stream; every
    image arrives once, on the GPU, with its label."""
    import numpy as np

    from fovea.data import DiskBatches

    dev = torch.device("cuda")
    images = torch.randint(0, 256, (300, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(300) % 3
    np.save(tmp_path / "set.npy", images.numpy())
    mapped = torch.from_numpy(np.load(tmp_path / "set.npy", mmap_mode="c"))
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    b = DiskBatches(mapped, labels, 32, file=tmp_path / "set.npy", device=dev, mean=(0.0,) * 3, std=(1 / 255,) * 3,
                    shuffle=True, generator=g)
    got = []
    for x, y in b:
        assert x.device.type == "cuda" and y.device.type == "cuda"
        got += [(xi.round().to(torch.uint8).cpu().numpy().tobytes(), int(yi)) for xi, yi in zip(x, y)]
    want = {images[i].numpy().tobytes(): int(labels[i]) for i in range(300)}
    assert len(got) == 300 and all(want[k] == y for k, y in got) and len({k for k, _ in got}) == 300
