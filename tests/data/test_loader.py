"""Batches from a uint8 tensor on the CPU: shapes, epochs, order, normalisation and augmentation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fovea.data import AUGMENTATIONS, Batches, normalize

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
N, S = 10, 16


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8, generator=g)
    images[:, 0, 0, 0] = torch.arange(N, dtype=torch.uint8)  # every image is distinct
    labels = torch.arange(N) % 3
    return images, labels


def batches(data: tuple[torch.Tensor, torch.Tensor], batch_size: int = 4, seed: int | None = 0, **kw: Any) -> Batches:
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return Batches(*data, batch_size, device=CPU, mean=MEAN, std=STD, generator=g, **kw)


def which(x: torch.Tensor, ref: torch.Tensor) -> list[int]:
    """Index in ref of each un-augmented image of x (float batches)."""
    out = []
    for img in x:
        hits = [i for i in range(len(ref)) if torch.allclose(img, ref[i], atol=1e-5)]
        assert len(hits) == 1
        out.append(hits[0])
    return out


def test_batch_shapes_and_dtypes(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    b = batches(data, 4)
    got = list(b)
    assert len(b) == len(got) == 3
    assert [len(y) for _, y in got] == [4, 4, 2]  # the last batch is kept by default
    for x, y in got:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, S, S) and x.device == CPU
        assert y.dtype == torch.int64 and len(x) == len(y)


def test_without_shuffle_the_order_is_the_input_order(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = data
    got = list(batches(data, 3))
    assert torch.equal(torch.cat([y for _, y in got]), labels)
    assert torch.allclose(torch.cat([x for x, _ in got]), normalize(images, MEAN, STD))


def test_shuffle_shows_every_sample_once_per_epoch(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = data
    ref = normalize(images, MEAN, STD)
    b = batches(data, 4, shuffle=True)
    orders = []
    for _ in range(3):
        xs, ys = zip(*b)
        order = which(torch.cat(xs), ref)
        assert sorted(order) == list(range(N))
        assert torch.equal(torch.cat(ys), labels[order])  # each label travels with its image
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1, "every epoch came in the same order"
    assert orders[0] != list(range(N))


def test_drop_last(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = data
    b = batches(data, 4, shuffle=True, drop_last=True)
    got = list(b)
    assert len(b) == len(got) == 2
    assert all(len(y) == 4 for _, y in got)
    seen = which(torch.cat([x for x, _ in got]), normalize(images, MEAN, STD))
    assert len(set(seen)) == 8  # 8 different images, the 2 left over are dropped this epoch


def test_drop_last_never_leaves_an_epoch_empty(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    b = batches(data, 64, drop_last=True)  # fewer images than one batch
    got = list(b)
    assert len(b) == len(got) == 1 and len(got[0][1]) == N


def test_batch_size_dividing_n(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    for drop_last in (False, True):
        b = batches(data, 5, drop_last=drop_last)
        assert len(b) == 2 and [len(y) for _, y in b] == [5, 5]


def test_a_seeded_generator_repeats_order_and_augmentation(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    def epochs(seed: int) -> list[torch.Tensor]:
        b = batches(data, 4, seed=seed, shuffle=True, augment="standard")
        return [x for _ in range(2) for x, _ in b]

    a, again, other = epochs(7), epochs(7), epochs(8)
    assert all(torch.equal(u, v) for u, v in zip(a, again))
    assert not all(u.shape == v.shape and torch.equal(u, v) for u, v in zip(a, other))


def test_a_default_generator_works(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    b = batches(data, 4, seed=None, shuffle=True, augment="flip")
    assert sum(len(y) for _, y in b) == N


def test_none_gives_exactly_the_normalised_images(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = data
    x = torch.cat([x for x, _ in batches(data, 4, augment="none")])
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = (images.float() / 255.0 - mean) / std
    assert torch.allclose(x, expected, atol=1e-5)
    assert torch.allclose(normalize(images, MEAN, STD), expected, atol=1e-5)
    assert x.min() < -1 and x.max() > 1  # normalised, not 0..1 or 0..255


def test_flip_gives_the_image_or_its_mirror(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = data
    ref = normalize(images, MEAN, STD)
    flipped = same = 0
    for _ in range(4):
        for i, (x, _) in enumerate(batches(data, N, seed=None, augment="flip")):
            assert i == 0
            for k in range(N):
                if torch.allclose(x[k], ref[k], atol=1e-4):
                    same += 1
                else:
                    assert torch.allclose(x[k], ref[k].flip(-1), atol=1e-4), f"image {k} is neither itself nor mirrored"
                    flipped += 1
    assert flipped > 0 and same > 0


def test_light_shifts_by_whole_pixels(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = data
    ref = normalize(images, MEAN, STD)
    pad = S // 8
    (x, _), = list(batches(data, N, augment="light"))
    moved = 0
    for k in range(N):
        inner = x[k, :, pad:-pad, pad:-pad]
        found = []
        for r in (ref[k], ref[k].flip(-1)):
            for dy in range(-pad, pad + 1):
                for dx in range(-pad, pad + 1):
                    if torch.allclose(inner, r[:, pad + dy : S - pad + dy, pad + dx : S - pad + dx], atol=1e-4):
                        found.append((dy, dx))
        assert found, f"image {k} is not a whole-pixel shift of the original or its mirror"
        moved += found[0] != (0, 0)
    assert moved > 0


def test_standard_keeps_shape_and_changes_pixels(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = data
    ref = normalize(images, MEAN, STD)
    (x, _), = list(batches(data, N, augment="standard"))
    assert x.shape == ref.shape and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert not torch.allclose(x, ref, atol=1e-3)
    assert x.min() >= ref.min() - 1e-4 and x.max() <= ref.max() + 1e-4  # bilinear: no values out of range


def test_every_listed_augmentation_runs(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert set(AUGMENTATIONS) == {"none", "flip", "light", "standard", "strong"}
    for policy in AUGMENTATIONS:
        x, y = next(iter(batches(data, 4, augment=policy)))
        assert x.shape == (4, 3, S, S) and len(y) == 4


def test_unknown_augmentation_is_an_error(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'") as info:
        list(batches(data, 4, augment="rotate"))
    assert "standard" in str(info.value)  # lists the choices


def test_sample_weights_draw_n_samples_favouring_heavy_ones(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = data
    weights = torch.zeros(N)
    weights[[2, 5]] = 1.0
    ref = normalize(images, MEAN, STD)
    b = batches(data, 4, sample_weights=weights)
    xs, ys = zip(*b)
    order = which(torch.cat(xs), ref)
    assert len(order) == N and set(order) <= {2, 5}
    assert torch.equal(torch.cat(ys), labels[order])


def test_channels_last(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = next(iter(batches(data, 4, augment="flip", channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)
