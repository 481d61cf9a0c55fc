"""Unknown-image scores: hand-computed values, the fitted state's round trip, the threshold's coverage."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from fovea.errors import FoveaError
from fovea.runtime.unknown import (
    DEFAULT_KEEP,
    DEFAULT_SCORE,
    SCORES,
    UNKNOWN_FILE,
    create_score,
    ledoit_wolf,
    list_scores,
    load_unknown,
    pixel_stats,
    save_unknown,
    threshold_at,
)


def toy(n: int = 120, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two classes of embeddings and the logits of a linear head on them."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    emb = rng.normal(size=(n, d)) + 3 * labels[:, None] + 1.0
    w = rng.normal(size=(2, d))
    return emb.astype(np.float32), (emb @ w.T + np.array([0.5, -0.5])).astype(np.float32), labels


def extra(score, n: int, seed: int = 0) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The images (N, 3, 8, 8) uint8 and stage statistics (N, 6) the runtime would pass ``score``, when it asks."""
    rng = np.random.default_rng(seed + 100)
    out = {}
    if score.uses_images:
        out["images"] = rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)
    if score.uses_stages:
        out["stages"] = rng.normal(size=(n, 6)) * [1, 2, 3, 1, 1, 1]
    return out


def fitted(name: str, **params: object):  # noqa: ANN201
    emb, logits, labels = toy()
    score = create_score(name, **params)
    score.fit(embeddings=emb if score.uses_embedding else None, logits=logits, labels=labels,
              **extra(score, len(labels)))
    return score


# ------------------------------------------------------------------------------------ every registered score


@pytest.mark.parametrize("name", sorted(SCORES))
def test_every_score_round_trips_through_safetensors(name: str, tmp_path) -> None:
    score = fitted(name)
    emb, logits, _ = toy(40, seed=1)
    more = extra(score, 40, seed=1)
    before = score(embeddings=emb, logits=logits, **more)
    assert before.shape == (40,) and before.dtype == np.float64 and np.isfinite(before).all()

    entry = save_unknown(tmp_path, score, threshold=1.5, keep=0.95, calibrated_on=40, kept=0.95)
    assert entry == {"score": name, "params": score.params(), "threshold": 1.5, "keep": 0.95, "calibrated_on": 40,
                     "kept": 0.95, "file": UNKNOWN_FILE}
    json.dumps(entry)  # it goes into model.json
    raw = (tmp_path / UNKNOWN_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: a little-endian header length, a JSON header, raw bytes
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["format"] == "fovea.unknown"
    # not a pickle (protocol 2+ starts with 0x80 and the protocol number 2-5; a safetensors header of 384 + 256 k
    # bytes also starts with 0x80, then 0x01)
    assert raw[8:9] == b"{" and not (raw[0] == 0x80 and 2 <= raw[1] <= 5)

    loaded, threshold = load_unknown(tmp_path, json.loads(json.dumps(entry)))
    assert threshold == 1.5 and type(loaded) is type(score)
    np.testing.assert_array_equal(loaded(embeddings=emb, logits=logits, **more), before)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_logit_scores_need_no_embedding_and_embedding_scores_say_so(name: str) -> None:
    score = fitted(name)
    _, logits, _ = toy(5)
    if score.uses_embedding:
        with pytest.raises(FoveaError, match="embedding"):
            score(embeddings=None, logits=logits, **extra(score, 5))
    else:
        assert score(embeddings=None, logits=logits, **extra(score, 5)).shape == (5,)


def test_registry_names_and_default() -> None:
    assert {"msp", "energy", "maxlogit", "mahalanobis", "knn", "vim", "combined", "pixels", "stages"} <= set(list_scores())
    assert DEFAULT_SCORE in SCORES and DEFAULT_KEEP == 0.95
    default = create_score(DEFAULT_SCORE)
    # the default reads logits + embedding only: no pixels, no stage hooks at prediction time
    assert not default.uses_images and not default.uses_stages


def test_the_default_score_reads_the_normalised_embedding() -> None:
    """Mahalanobis on the L2-normalised embedding: an image's embedding scaled up scores the same, while the
    same direction as a training class scores lower than a direction between the classes."""
    emb, labels = mahalanobis_toy()
    emb = emb + [1.0, 5.0]  # away from the origin, so that directions differ
    score = create_score(DEFAULT_SCORE)
    score.fit(embeddings=emb, logits=np.zeros((8, 2)), labels=labels)
    q = np.array([[1.0, 5.0], [3.0, 15.0], [-5.0, 0.2]])
    s = score(embeddings=q, logits=np.zeros((3, 2)))
    np.testing.assert_allclose(s[0], s[1], rtol=1e-9)
    assert s[2] > s[0] + 1


def test_a_misspelt_score_gets_did_you_mean() -> None:
    with pytest.raises(FoveaError, match="did you mean 'knn'"):
        create_score("knm")
    with pytest.raises(FoveaError, match="bad parameters"):
        create_score("knn", neighbours=3)


# ------------------------------------------------------------------------------------------ hand computed


def test_msp_energy_maxlogit_by_hand() -> None:
    logits = np.array([[0.0, math.log(3.0)], [2.0, 2.0]])
    np.testing.assert_allclose(create_score("msp")(embeddings=None, logits=logits), [0.25, 0.5])
    # -logsumexp: -log(1 + 3), -(2 + log 2)
    np.testing.assert_allclose(create_score("energy")(embeddings=None, logits=logits), [-math.log(4), -2 - math.log(2)])
    # T = 2: -2 log(e^1 + e^1) for logits (2, 2)
    np.testing.assert_allclose(create_score("energy", temperature=2.0)(embeddings=None, logits=logits)[1],
                               -2 * (1 + math.log(2)))
    np.testing.assert_allclose(create_score("maxlogit")(embeddings=None, logits=logits), [-math.log(3), -2.0])


def mahalanobis_toy() -> tuple[np.ndarray, np.ndarray]:
    """Two classes at (0, 0) and (10, 0), each the points mean +- (2, 0), +- (0, 1): the within-class covariance
    is diag(8/4, 2/4) = diag(2, 0.5)."""
    offsets = np.array([[2, 0], [-2, 0], [0, 1], [0, -1]], dtype=np.float64)
    emb = np.vstack([offsets, offsets + [10, 0]])
    return emb, np.repeat([0, 1], 4)


def test_mahalanobis_on_a_known_covariance() -> None:
    emb, labels = mahalanobis_toy()
    score = create_score("mahalanobis", shrinkage=0.0, normalize=False)
    score.fit(embeddings=emb, logits=np.zeros((8, 2)), labels=labels)
    q = np.array([[1.0, 1.0], [9.0, -0.5]])
    # (1, 1) to (0, 0): 1/2 + 1/0.5 = 2.5 (to (10, 0): 81/2 + 2); (9, -0.5) to (10, 0): 1/2 + 0.25/0.5 = 1
    np.testing.assert_allclose(score(embeddings=q, logits=np.zeros((2, 2))), [2.5, 1.0])

    rel = create_score("mahalanobis", shrinkage=0.0, relative=True, normalize=False)
    rel.fit(embeddings=emb, logits=np.zeros((8, 2)), labels=labels)
    # the whole set: mean (5, 0), covariance diag(2 + 25, 0.5); (1, 1): 16/27 + 2
    np.testing.assert_allclose(rel(embeddings=q[:1], logits=np.zeros((1, 2))), [2.5 - (16 / 27 + 2)])


def test_ledoit_wolf_matches_scikit_learn() -> None:
    from sklearn.covariance import ledoit_wolf_shrinkage

    x = np.random.default_rng(0).normal(size=(50, 20)) * np.linspace(0.5, 3, 20)
    x -= x.mean(0)
    assert ledoit_wolf(x) == pytest.approx(ledoit_wolf_shrinkage(x, assume_centered=True), rel=1e-10)


def test_knn_distance_on_a_tiny_bank() -> None:
    bank = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # unit vectors (1, 0), (0, 1), (-1, 0) once normalised
    q = np.array([[5.0, 0.0], [1.0, 1.0]])
    for k, want in ((1, [0.0, math.sqrt(2 - math.sqrt(2))]), (2, [math.sqrt(2), math.sqrt(2 - math.sqrt(2))]),
                    (3, [2.0, math.sqrt(2 + math.sqrt(2))])):
        score = create_score("knn", k=k)
        score.fit(embeddings=bank, logits=np.zeros((3, 2)), labels=np.array([0, 1, 0]))
        np.testing.assert_allclose(score(embeddings=q, logits=np.zeros((2, 2))), want, atol=1e-7)
    raw = create_score("knn", k=1, normalize=False)  # plain Euclidean: (5, 0) is 3 from (2, 0)
    raw.fit(embeddings=bank, logits=np.zeros((3, 2)), labels=np.array([0, 1, 0]))
    np.testing.assert_allclose(raw(embeddings=q[:1], logits=np.zeros((1, 2))), [3.0], atol=1e-6)
    sq = create_score("knn", k=1, power=0.5, normalize=False)  # sqrt first: (sqrt 5, 0) vs (sqrt 2, 0)
    sq.fit(embeddings=bank, logits=np.zeros((3, 2)), labels=np.array([0, 1, 0]))
    np.testing.assert_allclose(sq(embeddings=q[:1], logits=np.zeros((1, 2))), [math.sqrt(5) - math.sqrt(2)], atol=1e-6)
    with pytest.raises(FoveaError, match="only 3 training images"):
        create_score("knn", k=4).fit(embeddings=bank, logits=np.zeros((3, 2)), labels=np.array([0, 1, 0]))


def test_vim_residual_outside_the_principal_subspace() -> None:
    """Training embeddings lie near the plane z = 0; a linear head gives logits (x + 1, -x - 1), so the origin
    -pinv(W) b is (-1, 0, 0), the discarded direction is z, and an image at height t gets the virtual logit
    alpha |t|, alpha = mean max logit / mean residual norm on the training images (Wang et al. 2022, eq. 5-7)."""
    rng = np.random.default_rng(0)
    emb = np.c_[rng.normal(size=(200, 2)) * [3.0, 2.0], 0.01 * rng.normal(size=200)]
    logits = np.c_[emb[:, 0] + 1, -emb[:, 0] - 1]
    score = create_score("vim", dim=2)
    score.fit(embeddings=emb, logits=logits, labels=(emb[:, 0] > 0).astype(int))
    np.testing.assert_allclose(score.origin, [-1, 0, 0], atol=1e-9)
    np.testing.assert_allclose(np.abs(score.basis[:, 0]), [0, 0, 1], atol=1e-2)
    residual = np.abs((emb - score.origin) @ score.basis[:, 0])
    assert score.alpha[0] == pytest.approx(logits.max(1).mean() / residual.mean())
    q = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.05]])
    lq = np.c_[q[:, 0] + 1, -q[:, 0] - 1]
    v = score.alpha[0] * np.abs((q - score.origin) @ score.basis[:, 0])
    out = score(embeddings=q, logits=lq)
    np.testing.assert_allclose(out, v - np.log(np.exp(lq).sum(1) + np.exp(v)))
    assert out[1] > out[0]


def test_combined_is_the_sum_of_parts_standardised_out_of_fold() -> None:
    emb, logits, labels = toy()
    score = create_score("combined", parts=[{"name": "energy"}, {"name": "knn", "params": {"k": 3}}])
    score.fit(embeddings=emb, logits=logits, labels=labels)
    energy = create_score("energy")(embeddings=None, logits=logits)
    q25, q50, q75 = np.percentile(energy, [25, 50, 75])  # energy needs no fit: out-of-fold = in-sample
    assert score.center[0] == pytest.approx(q50) and score.scale[0] == pytest.approx(q75 - q25)
    knn = create_score("knn", k=3)
    knn.fit(embeddings=emb, logits=logits, labels=labels)
    e2, l2, _ = toy(10, seed=3)
    want = ((create_score("energy")(embeddings=None, logits=l2) - score.center[0]) / score.scale[0]
            + (knn(embeddings=e2, logits=l2) - score.center[1]) / score.scale[1])
    np.testing.assert_allclose(score(embeddings=e2, logits=l2), want)
    with pytest.raises(FoveaError, match="did you mean"):
        create_score("combined", parts=[{"name": "enrgy"}])


def test_pixel_stats_by_hand() -> None:
    red = np.zeros((1, 3, 4, 4), np.uint8)
    red[:, 0] = 255  # pure red: saturation 1 everywhere, no edges
    gray = np.full((1, 3, 4, 4), 128, np.uint8)
    stripes = np.zeros((1, 3, 4, 4), np.uint8)
    stripes[:, :, :, 1::2] = 255  # black and white columns: every horizontal step is 1, no vertical step
    x = np.concatenate([red, gray, stripes])
    np.testing.assert_allclose(pixel_stats(x, ["color"])[0], [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(pixel_stats(x, ["color"])[2], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(pixel_stats(x, ["saturation"]), [[1, 0, 0], [0, 0, 1], [0, 0, 1]], atol=1e-7)
    grad = pixel_stats(x, ["gradient"])
    np.testing.assert_allclose(grad[:2], 0, atol=1e-6)
    # stripes: |dx| = 1 per channel, |dy| = 0; the inner 2 x 2 Laplacian: 4 v - 2 (1 - v) - 2 v = +-2 everywhere
    np.testing.assert_allclose(grad[2], [1, 1, 1, 0, 0, 0, 2], atol=1e-6)
    assert pixel_stats(x, ["saturation", "color"]).shape == (3, 9)
    with pytest.raises(FoveaError, match="features must be"):
        create_score("pixels", features=["hue"])


def test_stages_score_is_mahalanobis_of_standardised_columns() -> None:
    """One Gaussian over the points +-(2, 0), +-(0, 1): standardised by sd (sqrt 2, sqrt 0.5) they have the
    identity covariance, so (1, 1) scores 1/2 + 1/0.5 = 2.5; ``columns`` picks the stage's part."""
    offsets = np.array([[2, 0], [-2, 0], [0, 1], [0, -1]], dtype=np.float64)
    stages = np.c_[np.full(4, 7.0), offsets]  # a first, constant column that columns [1, 3) leaves out
    score = create_score("stages", columns=[1, 3], shrinkage=0.0)
    assert score.uses_stages and not score.uses_images and not score.uses_embedding
    score.fit(embeddings=None, logits=np.zeros((4, 2)), labels=np.zeros(4, int), stages=stages)
    np.testing.assert_allclose(score(embeddings=None, logits=np.zeros((1, 2)), stages=np.array([[7.0, 1.0, 1.0]])),
                               [2.5])
    with pytest.raises(FoveaError, match="does not expose"):
        score(embeddings=None, logits=np.zeros((1, 2)))
    with pytest.raises(FoveaError, match="give 3 numbers"):
        create_score("stages", columns=[0, 5]).fit(embeddings=None, logits=np.zeros((4, 2)), labels=np.zeros(4),
                                                   stages=stages)
    with pytest.raises(FoveaError, match="columns must be"):
        create_score("stages", columns=[3, 1])


def test_pixels_score_is_mahalanobis_of_the_pixel_statistics() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 3, 6, 6), dtype=np.uint8)
    score = create_score("pixels", features=["color"], shrinkage=0.0)
    score.fit(embeddings=None, logits=np.zeros((50, 2)), labels=np.zeros(50, int), images=images)
    z = pixel_stats(images, ["color"])
    mean, sd = z.mean(0), z.std(0)
    cov = np.cov(((z - mean) / sd).T, bias=True)
    q = rng.integers(0, 256, size=(3, 3, 6, 6), dtype=np.uint8)
    zq = (pixel_stats(q, ["color"]) - mean) / sd
    want = np.einsum("ij,jk,ik->i", zq, np.linalg.inv(cov), zq)
    np.testing.assert_allclose(score(embeddings=None, logits=np.zeros((3, 2)), images=q), want, rtol=1e-6)
    with pytest.raises(FoveaError, match="pixels"):
        score(embeddings=None, logits=np.zeros((3, 2)))


def test_combined_passes_images_and_stages_to_the_parts_that_read_them() -> None:
    emb, logits, labels = toy()
    parts = [{"name": "energy"}, {"name": "pixels", "params": {"features": ["color"]}}]
    score = create_score("combined", parts=parts)
    assert score.uses_images and not score.uses_stages  # per instance: the runtime passes images= to this one
    assert not create_score("combined", parts=[{"name": "energy"}]).uses_images
    assert create_score("combined", parts=[{"name": "stages"}]).uses_stages
    more = extra(score, len(labels))
    score.fit(embeddings=emb, logits=logits, labels=labels, **more)
    pixels = create_score("pixels", features=["color"])
    pixels.fit(embeddings=None, logits=logits, labels=labels, **more)
    e2, l2, _ = toy(10, seed=3)
    q = extra(score, 10, seed=3)
    want = ((create_score("energy")(embeddings=None, logits=l2) - score.center[0]) / score.scale[0]
            + (pixels(embeddings=None, logits=l2, **q) - score.center[1]) / score.scale[1])
    np.testing.assert_allclose(score(embeddings=e2, logits=l2, **q), want)


# ------------------------------------------------------------------------------------------- threshold


def test_threshold_keeps_the_share_in_sample() -> None:
    s = np.random.default_rng(0).standard_normal(100_000)
    t = threshold_at(s, 0.95)
    kept = (s <= t).mean()
    assert 0.95 <= kept <= 0.95 + 2 / len(s)
    assert threshold_at(np.arange(10.0), 0.95) == 9.0  # too few for the order statistic: the largest
    with pytest.raises(FoveaError):
        threshold_at(np.array([]), 0.95)
    with pytest.raises(FoveaError):
        threshold_at(np.ones(5), 1.0)


def test_threshold_keeps_the_share_out_of_sample() -> None:
    """Uniform scores: a threshold t keeps exactly t of new images. The ceil((n + 1) keep)-th of n = 99 is
    Beta(95, 5), mean 0.95; over R draws the mean keep rate of a valid estimator falls more than 3.72 standard
    errors below 0.95 with probability < 1e-4 (and above 0.95 + 3.72 se: not needlessly conservative)."""
    n, r, keep = 99, 4000, 0.95
    rng = np.random.default_rng(0)
    kept = np.array([threshold_at(rng.random(n), keep) for _ in range(r)])
    k = math.ceil((n + 1) * keep)
    se = math.sqrt(k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2)) / r)
    assert keep - 3.72 * se <= kept.mean() <= keep + 3.72 * se


# ------------------------------------------------------------------------------------------- damaged state


def test_load_unknown_refuses_a_damaged_or_foreign_entry(tmp_path) -> None:
    score = fitted("knn", k=3)
    entry = save_unknown(tmp_path, score, threshold=0.3, keep=0.95, calibrated_on=40, kept=0.95)
    for bad, match in (({**entry, "score": "knm"}, "not one this Fovea knows"),
                       ({**entry, "threshold": float("nan")}, "not a finite number"),
                       ({**entry, "threshold": "0.3"}, "not a finite number"),
                       ({**entry, "file": "../x.safetensors"}, "a file name"),
                       ({**entry, "params": {"k": 0}}, "k must be"),
                       ({**entry, "params": {"neighbours": 3}}, "not its own"),
                       ("knn", "not an object")):
        with pytest.raises(FoveaError, match=match):
            load_unknown(tmp_path, bad)  # type: ignore[arg-type]
    other = {**entry, "score": "mahalanobis", "params": fitted("mahalanobis").params()}
    with pytest.raises(FoveaError, match="expected"):  # the arrays of another score
        load_unknown(tmp_path, other)
    (tmp_path / UNKNOWN_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(FoveaError, match="cannot read"):
        load_unknown(tmp_path, entry)
    (tmp_path / UNKNOWN_FILE).unlink()
    with pytest.raises(FoveaError, match="cannot read"):
        load_unknown(tmp_path, entry)


def test_knn_keeps_a_bounded_bank_and_scores_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past KNN_MAX_BANK training images the bank is a seeded subset (memory and per-image cost stop growing with
    the data), and queries are scored in blocks with the same answers as all at once."""
    import fovea.runtime.unknown as unknown_mod

    monkeypatch.setattr(unknown_mod, "KNN_MAX_BANK", 500)
    rng = np.random.default_rng(0)
    train = rng.normal(size=(2000, 16)).astype(np.float32)
    score = unknown_mod.create_score("knn", k=5)
    score.fit(embeddings=train, logits=np.zeros((2000, 2)), labels=np.zeros(2000, int))
    assert score.arrays()["bank"].shape == (500, 16)
    queries = rng.normal(size=(300, 16)).astype(np.float32)
    whole = score(embeddings=queries, logits=np.zeros((300, 2)))
    monkeypatch.setattr(unknown_mod, "KNN_BLOCK", 500 * 7)  # 7 queries a block
    assert np.allclose(score(embeddings=queries, logits=np.zeros((300, 2))), whole, rtol=1e-6)  # float32 dots
