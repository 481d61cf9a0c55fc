"""Data drift: is a window of traffic distributed like the model's reference?

Five families of tests, each giving one p-value:

- ``embedding_mmd``: maximum mean discrepancy between the reference's and the window's penultimate-layer
  embeddings (projected on the reference's principal components), Gaussian kernel at the median distance,
  with a permutation test whose null pools both samples and reshuffles them (not a bootstrap of the
  reference alone, which ignores the window's own sampling noise).
- ``embedding_ks``: a Kolmogorov-Smirnov test per principal component, Bonferroni-corrected.
- ``image_stats``: a Kolmogorov-Smirnov test per image statistic (brightness, contrast, colourfulness,
  sharpness, width, height, aspect), Bonferroni-corrected.
- ``label_shift``: a chi-square test of the window's predicted labels against the reference's proportions.
- ``confidence``: a Kolmogorov-Smirnov test of the top-class probability (a drop means the model is less sure).

The window counts as drifted when the smallest family p-value, Bonferroni-corrected over the families that
could run, is below ``alpha``: a normal window raises a false alarm with probability at most ``alpha``.

Written here rather than taken from alibi-detect (Business Source License since 0.12) or TorchDrift (no
release since 2021): a permutation MMD is twenty lines of NumPy over one kernel matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fovea.monitor._reference import Sample
from fovea.monitor._stats import SQUARE, STATS

FAMILIES = ("embedding_mmd", "embedding_ks", "image_stats", "label_shift", "confidence")


@dataclass
class Test:
    family: str
    p_value: float
    statistic: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class DriftResult:
    n_reference: int
    n_window: int
    alpha: float
    tests: list[Test]
    p_value: float  # the families' smallest p-value, Bonferroni-corrected over them
    drift: bool
    skipped: dict[str, str] = field(default_factory=dict)  # family -> why it could not run

    def flagged(self) -> list[str]:
        return [t.family for t in self.tests if t.p_value < self.alpha]

    def family(self, name: str) -> Test | None:
        return next((t for t in self.tests if t.family == name), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flagged"] = self.flagged()
        return d


def _pca(reference: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection (D, k)) fitted on the reference."""
    mean = reference.mean(0)
    _, _, vt = np.linalg.svd(reference - mean, full_matrices=False)
    return mean, vt[:components].T


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int = 1000,
                         seed: int = 0) -> tuple[float, float]:
    """(MMD², p-value) of samples x (n, d) and y (m, d) under a Gaussian kernel, by permutation of the pooled
    sample: p = (1 + #{permuted statistic >= observed}) / (1 + permutations)."""
    z = np.concatenate([x, y]).astype(np.float64)
    n, total = len(x), len(x) + len(y)
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    bandwidth = np.median(d2[np.triu_indices(total, 1)]) or 1.0  # the median heuristic
    k = np.exp(-d2 / bandwidth)
    np.fill_diagonal(k, 0)  # drop self-similarity: the statistic below is then the unbiased MMD²

    def statistic(members: np.ndarray) -> np.ndarray:
        """Unbiased MMD² for each row of ``members`` (P, total): True where a point belongs to the first sample."""
        a = members.astype(np.float64)
        b = 1 - a
        m = total - n
        ka = a @ k  # (P, total): one matrix product serves all three sums
        kxx = (ka * a).sum(1) / (n * (n - 1))
        kxy = (ka * b).sum(1) / (n * m)
        kyy = ((b @ k) * b).sum(1) / (m * (m - 1))
        return kxx + kyy - 2 * kxy

    rng = np.random.default_rng(seed)
    observed = statistic(np.arange(total)[None, :] < n)[0]
    null = np.empty(permutations)
    for start in range(0, permutations, 100):  # 100 permutations per matrix product keeps memory small
        count = min(100, permutations - start)
        members = np.zeros((count, total), bool)
        for r in range(count):
            members[r, rng.permutation(total)[:n]] = True
        null[start : start + count] = statistic(members)
    return float(observed), float((1 + (null >= observed).sum()) / (1 + permutations))


def _ks_family(reference: np.ndarray, window: np.ndarray, names: list[str]) -> Test | None:
    from scipy.stats import ks_2samp

    rows = []
    for j, name in enumerate(names):
        a, b = reference[:, j], window[:, j]
        if np.ptp(a) == 0 and np.ptp(b) == 0 and a[0] == b[0]:
            continue  # constant and equal (e.g. every image the same size): nothing to test
        r = ks_2samp(a, b)
        rows.append((name, float(r.statistic), float(r.pvalue)))
    if not rows:
        return None
    worst = min(rows, key=lambda t: t[2])
    detail = {name: {"ks": round(stat, 4), "p": p, "reference_median": float(np.median(reference[:, names.index(name)])),
                     "window_median": float(np.median(window[:, names.index(name)]))} for name, stat, p in rows}
    return Test("", min(1.0, worst[2] * len(rows)), worst[1], {"worst": worst[0], "per_feature": detail})


def detect(reference: Sample, window: Sample, classes: list[str], *, alpha: float = 0.05,
           max_reference: int = 500, components: int = 16, permutations: int = 1000, seed: int = 0) -> DriftResult:
    """Test ``window`` against ``reference`` with every family the two samples allow."""
    from scipy.stats import chisquare, ks_2samp

    if len(window) < 10:
        raise ValueError(f"a window needs at least 10 images to test, got {len(window)}")
    rng = np.random.default_rng(seed)
    ref_idx = np.arange(len(reference))
    if len(ref_idx) > max_reference:  # the kernel matrix grows with the square of the pooled size
        ref_idx = np.sort(rng.choice(len(ref_idx), max_reference, replace=False))
    tests: list[Test] = []
    skipped: dict[str, str] = {}

    if reference.embeddings is not None and window.embeddings is not None:
        ref_e = reference.embeddings.astype(np.float64)
        mean, proj = _pca(ref_e, min(components, ref_e.shape[1], len(ref_e) - 1))
        scale = (ref_e - mean) @ proj
        sd = scale.std(0) + 1e-12  # whiten, so that no component dominates the kernel distance
        a = ((ref_e[ref_idx] - mean) @ proj) / sd
        b = ((window.embeddings.astype(np.float64) - mean) @ proj) / sd
        stat, p = mmd_permutation_test(a, b, permutations, seed)
        tests.append(Test("embedding_mmd", p, stat, {"components": proj.shape[1], "permutations": permutations}))
        ks = _ks_family(scale / sd, b, [f"pc{i + 1}" for i in range(proj.shape[1])])
        if ks is not None:
            ks.family = "embedding_ks"
            tests.append(ks)
    else:
        why = "no embeddings in the reference" if reference.embeddings is None else "no embeddings in the window"
        skipped["embedding_mmd"] = skipped["embedding_ks"] = why + " (an ONNX or torch.export model exposes none)"

    names = list(STATS)
    # the header's width, height and aspect are 0 where they were not recorded
    usable = [j for j in range(len(names)) if j < SQUARE or (window.stats[:, j] > 0).any()]
    img = _ks_family(reference.stats[:, usable], window.stats[:, usable], [names[j] for j in usable])
    if img is not None:
        img.family = "image_stats"
        tests.append(img)

    c = len(classes)
    expected_p = (np.bincount(reference.predicted, minlength=c) + 0.5) / (len(reference) + 0.5 * c)
    observed = np.bincount(window.predicted, minlength=c)
    chi = chisquare(observed, expected_p / expected_p.sum() * observed.sum())
    tests.append(Test("label_shift", float(chi.pvalue), float(chi.statistic),
                      {"reference": {k: round(float(v), 4) for k, v in zip(classes, expected_p / expected_p.sum())},
                       "window": {k: round(float(v) / max(1, int(observed.sum())), 4) for k, v in zip(classes, observed)}}))

    conf = ks_2samp(reference.confidence, window.confidence)
    tests.append(Test("confidence", float(conf.pvalue), float(conf.statistic),
                      {"reference_mean": float(reference.confidence.mean()), "window_mean": float(window.confidence.mean())}))

    p = min(1.0, min(t.p_value for t in tests) * len(tests))
    return DriftResult(len(reference), len(window), alpha, tests, p, p < alpha, skipped)
