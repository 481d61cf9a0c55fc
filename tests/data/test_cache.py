"""Decoding real photos once into a uint8 ImageSet, the disk cache under FOVEA_HOME, and the quarantine list."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_subset
from PIL import Image

import fovea.data._cache as cache_mod
from fovea.data import ImageSet, Sample, load_images, load_square

SIZE = 24


@pytest.fixture
def photos(tmp_path: Path, pets_root: Path) -> list[Sample]:
    """Six real photos (train: 2 cats, 2 dogs; val: 1 of each), copied so a test may change them."""
    root = make_subset(tmp_path / "pets", 2, 1, pets_root)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 6
    return [Sample(str(p), 0 if p.parent.name == "cat" else 1) for p in files]


class DecodeCounter:
    """Wraps the decode + resize the cache module calls per image, to count the images really decoded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = cache_mod.load_square

        def counted(*args: object, **kw: object) -> object:
            self.calls += 1
            return real(*args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(cache_mod, "load_square", counted)


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> object:
        raise AssertionError("decoded an image although the cache should have served it")

    monkeypatch.setattr(cache_mod, "load_square", refuse)


def load(samples: list[Sample], size: int = SIZE, **kw: object) -> ImageSet:
    return load_images(samples, size, progress=False, workers=2, **kw)  # type: ignore[arg-type]


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npy")) if folder.is_dir() else []


def same(a: ImageSet, b: ImageSet) -> bool:
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.paths == b.paths
            and a.quarantined == b.quarantined)


# ------------------------------------------------------------------------------------------------ decoding


def test_real_photos_become_a_uint8_tensor(photos: list[Sample]) -> None:
    out = load(photos, cache=False)
    assert isinstance(out, ImageSet) and len(out) == 6
    assert out.images.dtype == torch.uint8 and out.images.shape == (6, 3, SIZE, SIZE)
    assert out.images.is_contiguous()
    assert out.labels.dtype == torch.int64 and out.labels.tolist() == [s.label for s in photos]
    assert out.paths == [s.path for s in photos]
    assert out.quarantined == []
    for i, s in enumerate(photos):  # same pixels as the one resize used everywhere else
        expected = torch.from_numpy(load_square(s.path, SIZE).copy()).permute(2, 0, 1)
        assert torch.equal(out.images[i], expected)
    assert out.images.float().std() > 10  # real photos, not blank


def test_bad_files_are_quarantined_and_good_ones_kept_in_order(photos: list[Sample], tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "readme.jpg"
    text.write_text("not a photo")
    cut = tmp_path / "cut.jpg"
    data = Path(photos[0].path).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    samples = [photos[0], Sample(str(empty), 1), photos[3], Sample(str(text), 0), Sample(str(cut), 1), photos[5]]

    out = load(samples)
    assert out.paths == [photos[0].path, photos[3].path, photos[5].path]
    assert out.labels.tolist() == [photos[0].label, photos[3].label, photos[5].label]
    assert out.images.shape == (3, 3, SIZE, SIZE)
    assert [p for p, _ in out.quarantined] == [str(empty), str(text), str(cut)]
    reasons = dict(out.quarantined)
    assert "empty" in reasons[str(empty)]
    assert "not an image" in reasons[str(text)]
    assert "truncated" in reasons[str(cut)]
    assert torch.equal(out.images[1], load(photos[3:4], cache=False).images[0])

    again = load(samples)  # from the cache: the same list, reasons included
    assert same(out, again)


def test_nothing_usable_gives_an_empty_set(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    out = load([Sample(str(bad), 0)])
    assert out.images.shape == (0, 3, SIZE, SIZE) and out.images.dtype == torch.uint8
    assert out.labels.shape == (0,) and out.paths == []
    assert out.quarantined == [(str(bad), "not an image (unrecognised format)")]


def test_oversized_image_is_quarantined_with_the_limit(photos: list[Sample], tmp_path: Path) -> None:
    w, h = Image.open(photos[0].path).size
    big = tmp_path / "big.png"
    Image.new("RGB", (w + 1, h)).save(big)  # one column more than the photo: over the limit
    out = load([photos[0], Sample(str(big), 1)], max_pixels=w * h)
    assert out.paths == [photos[0].path]
    assert out.quarantined[0][0] == str(big) and "too large" in out.quarantined[0][1]


# ---------------------------------------------------------------------------------------------- the cache


def test_cache_is_written_under_fovea_home_and_served_from_there(
    photos: list[Sample], fovea_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load(photos)
    files = entries(fovea_home / "cache")
    assert len(files) == 1 and files[0].with_suffix(".json").is_file()
    assert not list((fovea_home / "cache").glob("*.tmp*"))
    assert np.load(files[0], allow_pickle=False).shape == (6, 3, SIZE, SIZE)

    forbid_decoding(monkeypatch)
    second = load(photos)
    assert same(first, second)


def test_renamed_folder_still_hits_the_cache(photos: list[Sample], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    first = load(photos)
    moved = shutil.copytree(Path(photos[0].path).parents[2], tmp_path / "renamed")
    renamed = [Sample(str(moved / Path(s.path).relative_to(Path(photos[0].path).parents[2])), s.label) for s in photos]
    forbid_decoding(monkeypatch)
    second = load(renamed)
    assert torch.equal(first.images, second.images)
    assert second.paths == [s.path for s in renamed]  # the paths are today's, not the cached ones


def test_editing_one_image_invalidates_the_cache(photos: list[Sample], fovea_home: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    first = load(photos)
    target = Path(photos[2].path)
    Image.open(target).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target, quality=90)

    counter = DecodeCounter(monkeypatch)
    second = load(photos)
    assert counter.calls == 6
    assert len(entries(fovea_home / "cache")) == 2
    assert not torch.equal(second.images[2], first.images[2])
    assert torch.equal(second.images[2], torch.from_numpy(load_square(target, SIZE)).permute(2, 0, 1))
    others = [0, 1, 3, 4, 5]
    assert torch.equal(second.images[others], first.images[others])


def test_relabelling_is_not_served_stale_labels(photos: list[Sample]) -> None:
    load(photos)
    flipped = [Sample(s.path, 1 - s.label) for s in photos]
    assert load(flipped).labels.tolist() == [1 - s.label for s in photos]


def test_each_size_has_its_own_entry(photos: list[Sample], fovea_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = load(photos, 16), load(photos, 32)
    assert small.images.shape == (6, 3, 16, 16) and large.images.shape == (6, 3, 32, 32)
    assert len(entries(fovea_home / "cache")) == 2
    forbid_decoding(monkeypatch)
    assert load(photos, 16).images.shape[-1] == 16
    assert load(photos, 32).images.shape[-1] == 32


def test_cache_false_writes_nothing_and_a_folder_is_used_as_given(
    photos: list[Sample], fovea_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load(photos, cache=False)
    assert entries(fovea_home / "cache") == []

    mine = tmp_path / "my_cache"
    first = load(photos, cache=mine)
    assert len(entries(mine)) == 1 and entries(fovea_home / "cache") == []
    forbid_decoding(monkeypatch)
    assert same(first, load(photos, cache=str(mine)))


def test_a_damaged_cache_entry_is_rebuilt(photos: list[Sample], fovea_home: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    first = load(photos)
    (npy,) = entries(fovea_home / "cache")
    npy.write_bytes(b"garbage, not an array")
    counter = DecodeCounter(monkeypatch)
    second = load(photos)
    assert counter.calls == 6
    assert same(first, second)
    assert np.load(npy, allow_pickle=False).shape == (6, 3, SIZE, SIZE)  # rewritten


def test_a_file_listed_twice_keeps_both_labels_on_a_cache_hit(photos: list[Sample], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A CSV may list one file twice, even under two labels; the cache must not merge the rows."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    samples = [photos[0], photos[1], Sample(photos[0].path, 1), Sample(str(broken), 0), Sample(str(broken), 1)]
    first = load(samples)
    assert first.labels.tolist() == [0, 0, 1]
    assert [p for p, _ in first.quarantined] == [str(broken), str(broken)]
    forbid_decoding(monkeypatch)
    assert same(load(samples), first)


def test_forked_decoding_gives_what_threads_give(tmp_path: Path) -> None:
    """Many cores and many images: decoding forks processes that write into one shared array."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(530):  # >= 512 images and 4 workers take the process path
        p = tmp_path / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (10 + i % 7, 12, 3), dtype=np.uint8)).save(p)
        samples.append(Sample(str(p), i % 3))
    (tmp_path / "100.png").write_bytes(b"")  # one unusable file in the middle
    forked = load_images(samples, 8, cache=False, workers=4, progress=False)
    threads = load_images(samples, 8, cache=False, workers=1, progress=False)
    assert same(forked, threads)
    assert len(forked) == 529 and forked.quarantined == [(samples[100].path, "empty file (0 bytes)")]
    assert forked.labels.tolist() == [s.label for j, s in enumerate(samples) if j != 100]
