"""The disk store: images decoded into the cache file (resumably) and read back in batches, shuffled by blocks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_subset

import fovea
import fovea.data._cache as cache_mod
from fovea.data import DiskBatches, Sample, choose_store, load_images
from fovea.data._disk import block_order, read_rows
from fovea.errors import FoveaError

SIZE = 24
CPU = torch.device("cpu")


@pytest.fixture
def photos(tmp_path: Path, pets_root: Path) -> list[Sample]:
    """40 real photos sorted by class (20 cats, then 20 dogs), and one broken file among them."""
    root = make_subset(tmp_path / "pets", 20, 0, pets_root)
    files = sorted(root.rglob("*.jpg"))
    broken = files[5].with_name("broken.jpg")
    broken.write_bytes(b"not a jpeg")
    return [Sample(str(p), 0 if p.parent.name == "cat" else 1) for p in sorted([*files, broken])]


def test_the_disk_store_holds_what_memory_holds_and_maps_it(photos: list[Sample], tmp_path: Path) -> None:
    mem = load_images(photos, SIZE, cache=tmp_path / "m", progress=False)
    disk = load_images(photos, SIZE, cache=tmp_path / "d", progress=False, store="disk")
    assert disk.file is not None and disk.file.exists() and mem.file is None
    assert torch.equal(mem.images, disk.images) and torch.equal(mem.labels, disk.labels)
    assert mem.paths == disk.paths and mem.quarantined == disk.quarantined and len(disk.quarantined) == 1
    assert not list((tmp_path / "d").glob("*partial*"))  # the partial file became the entry
    # the same entry serves either store: a memory load after a disk one decodes nothing
    again = load_images(photos, SIZE, cache=tmp_path / "d", progress=False)
    assert again.file is None and torch.equal(again.images, mem.images)
    with pytest.raises(FoveaError, match="cache folder"):
        load_images(photos, SIZE, cache=False, progress=False, store="disk")


def test_rows_of_a_disk_set_are_read_from_its_file_into_memory_of_their_own(photos: list[Sample],
                                                                          tmp_path: Path) -> None:
    """Whole-set passes read a disk-backed set a block at a time (``ImageSet.rows``): the same pixels as memory's,
    in a new tensor rather than a view of the map, whose pages would stay in the process's resident memory."""
    mem = load_images(photos, SIZE, cache=False, progress=False)
    disk = load_images(photos, SIZE, cache=tmp_path, progress=False, store="disk")
    n = len(mem)
    for lo, hi in ((0, 7), (7, 30), (30, n + 5), (n, n + 3)):  # past the end: cut, as a slice is
        got = disk.rows(lo, hi)
        assert torch.equal(got, mem.rows(lo, hi)) and got.dtype == torch.uint8
        assert got.untyped_storage().data_ptr() != disk.images.untyped_storage().data_ptr()
    assert mem.rows(3, 9).untyped_storage().data_ptr() == mem.images.untyped_storage().data_ptr()  # memory: a view


def test_a_killed_decode_resumes_at_the_first_chunk_not_written(photos: list[Sample], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "CHUNK_BYTES", 8 * 3 * SIZE * SIZE)  # chunks of 8 images: 6 chunks for 41
    real, calls = cache_mod._decode_all, {"chunks": 0, "images": 0}

    def dies_at_the_third(paths: list[str], *a: object, **kw: object) -> object:
        calls["chunks"] += 1
        if calls["chunks"] == 3:
            raise KeyboardInterrupt  # as a kill would stop it, mid-decode
        calls["images"] += len(paths)
        return real(paths, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_mod, "_decode_all", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        load_images(photos, SIZE, cache=tmp_path, progress=False, store="disk")
    assert calls["images"] == 16 and not list(tmp_path.glob("*.json"))  # two chunks on disk, no entry yet
    calls["images"] = 0
    resumed = load_images(photos, SIZE, cache=tmp_path, progress=False, store="disk")
    assert calls["images"] == len(photos) - 16  # only the chunks not written were decoded
    fresh = load_images(photos, SIZE, cache=False, progress=False)
    assert torch.equal(resumed.images, fresh.images) and resumed.quarantined == fresh.quarantined


def test_block_order_is_a_permutation_that_mixes_blocks() -> None:
    g = torch.Generator().manual_seed(0)
    order = block_order(1000, 50, 200, g)
    assert sorted(order.tolist()) == list(range(1000))
    first = order[:200]
    assert len(set((first // 50).tolist())) == 4  # a window is 4 random blocks of 50 rows, rows shuffled within
    assert not torch.equal(order, block_order(1000, 50, 200, g))  # a new order each epoch


def test_read_rows_reads_runs_of_rows(tmp_path: Path) -> None:
    data = np.arange(100 * 6, dtype=np.uint8).reshape(100, 6)
    (tmp_path / "rows").write_bytes(b"head" + data.tobytes())
    import os

    fd = os.open(tmp_path / "rows", os.O_RDONLY)
    rows = np.array([0, 1, 2, 7, 50, 51, 99])
    out = np.empty((len(rows), 6), np.uint8)
    read_rows(fd, 4, 6, rows, out)
    os.close(fd)
    assert np.array_equal(out, data[rows])


def test_disk_batches_cover_every_image_once_with_its_label(photos: list[Sample], tmp_path: Path) -> None:
    disk = load_images(photos, SIZE, cache=tmp_path, progress=False, store="disk")
    assert disk.file is not None
    key = {disk.images[i].numpy().tobytes(): int(disk.labels[i]) for i in range(len(disk))}

    def epoch(seed: int, shard: tuple[int, int] = (0, 1)) -> list[tuple[bytes, int]]:
        g = torch.Generator().manual_seed(seed)
        b = DiskBatches(disk.images, disk.labels, 8, file=disk.file, device=CPU, mean=(0.0,) * 3, std=(1 / 255,) * 3,
                        shuffle=True, generator=g, shard=shard)
        out = []
        for x, y in b:  # mean 0, std 1/255: x is the raw pixels again
            out += [(xi.round().to(torch.uint8).numpy().tobytes(), int(yi)) for xi, yi in zip(x, y)]
        return out

    seen = epoch(0)
    assert sorted(k for k, _ in seen) == sorted(key) and all(key[k] == y for k, y in seen)  # each once, its label
    assert seen == epoch(0) and seen != epoch(1)  # a seed repeats its order; another differs
    halves = epoch(0, (0, 2)) + epoch(0, (1, 2))  # two processes: the same order, each its share of every batch
    assert sorted(halves) == sorted(seen)


def test_auto_holds_a_set_in_memory_unless_it_exceeds_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOVEA_MEMORY_BUDGET", "100MB")
    assert choose_store("auto", 5000, 64, CPU)[0] == "memory"  # 61 MB
    store, why = choose_store("auto", 10_000, 64, CPU)  # 123 MB
    assert store == "disk" and "more than FOVEA_MEMORY_BUDGET" in why
    assert choose_store("auto", 5000, 64, CPU, copies=2)[0] == "disk"  # two processes hold two copies
    assert choose_store("memory", 10_000, 64, CPU)[0] == "memory" and choose_store("disk", 10, 64, CPU)[0] == "disk"
    with pytest.raises(FoveaError, match="--cache"):
        choose_store("ram", 10, 64, CPU)
    monkeypatch.setenv("FOVEA_MEMORY_BUDGET", "lots")
    with pytest.raises(FoveaError, match="FOVEA_MEMORY_BUDGET"):
        choose_store("auto", 10, 64, CPU)


def test_training_past_the_memory_budget_reads_from_disk(tiny_pets: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    import fovea.runtime._predictor as predictor_mod
    from fovea.data import ImageSet

    monkeypatch.setenv("FOVEA_MEMORY_BUDGET", "10KB")
    monkeypatch.setattr(predictor_mod, "BLOCK_BYTES", 3 * 32 * 32 * 16)  # blocks of 16 images
    read: list[tuple[int, int, int]] = []  # (set size, lo, hi) of each block the end of the run read
    rows = ImageSet.rows

    def counted(self: ImageSet, lo: int, hi: int) -> torch.Tensor:
        out = rows(self, lo, hi)
        read.append((len(self), lo, lo + len(out)))
        return out

    monkeypatch.setattr(ImageSet, "rows", counted)
    with caplog.at_level(logging.INFO, logger="fovea"):
        run = fovea.train(tiny_pets, model="cnn", image_size=32, epochs=2, extra={"widths": (8, 16, 16, 16)},
                          out=str(tmp_path / "run"), progress=False)
    assert any("read from the cache file in batches" in r.getMessage() for r in caplog.records)
    # the end of the run (training accuracy, fitting the unknown score) read the 80 training images from the file
    # a block at a time, every row in each of its two passes; the unknown score's threshold, the 40 validation ones
    train_blocks = sorted((lo, hi) for n, lo, hi in read if n == 80)
    assert train_blocks == sorted(2 * [(lo, min(lo + 16, 80)) for lo in range(0, 80, 16)])
    assert sum(hi - lo for n, lo, hi in read if n == 40) == 40
    model = fovea.load(run)
    val = sorted((tiny_pets / "val").rglob("*.jpg"))
    predictions, skipped = model.predict([str(p) for p in val])
    assert len(predictions) == len(val) and not skipped
