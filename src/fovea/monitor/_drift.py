"""Data drift: is a window of traffic distributed like the model's reference?

Five families of tests, each giving one p-value:

- ``embedding_mmd``: maximum mean discrepancy between the reference's and the window's penultimate-layer
  embeddings, projected on principal components fitted on the **pooled** sample (reference and window
  together), Gaussian kernel at the median distance of the pooled sample, with a permutation test whose null
  pools both samples and reshuffles them (not a bootstrap of the reference alone, which ignores the window's
  own sampling noise).
- ``embedding_ks``: a Kolmogorov-Smirnov test per pooled principal component, Bonferroni-corrected.
- ``image_stats``: a Kolmogorov-Smirnov test per image statistic (brightness, contrast, colourfulness,
  sharpness, width, height, aspect), Bonferroni-corrected.
- ``label_shift``: a two-sample test of the predicted labels, reference counts against window counts (a 2 x C
  contingency table): Fisher's exact test for two classes, a Monte-Carlo exact test of the chi-square
  statistic for more.
- ``confidence``: a Kolmogorov-Smirnov test of the top-class probability (a drop means the model is less sure).
- ``unknown_rate``: for a model that answers "unknown", Fisher's exact test of the share of images over its
  unknown threshold, reference against window (more images of none of the classes than at validation). The
  threshold was set on the reference images themselves (it keeps 95 % of them); the error of that quantile has
  the variance of a proportion of the reference's size, which is what the two-sample test allows for.

The window counts as drifted when the smallest family p-value, Bonferroni-corrected over the families that
could run, is below ``alpha``: a normal window raises a false alarm with probability at most ``alpha``.

That promise needs every family to be a valid two-sample test, with the reference treated as what it is, a
sample. Each family here is exact (or conservative) under exchangeability of reference and window images:

- Everything the embedding tests compute before comparing (the mean, the principal components, the
  whitening scale, the kernel bandwidth) is a symmetric function of the pooled sample, so permuting reference
  and window labels leaves it unchanged and the permutation (MMD) and Kolmogorov-Smirnov null distributions
  hold exactly. Components fitted on the reference alone overfit it (200 reference images, a 384-dimensional
  embedding: the reference's spread along its own top components is inflated against any new image's). With
  the pets cnn, references of 200 pets/val images and windows of 40 or 100 pets-extra images, embedding_mmd
  then flagged 15.6 % and 29.6 % of 500 normal windows at alpha 0.05, the verdict 7.6 % and 14.0 %
  (bench/drift_calibration.py).
- The label test compares two samples' counts. The former one-sample chi-square took the reference's
  proportions as exactly known; with reference 200 and window 40 its false-alarm rate was 7.8 % at alpha 0.05
  and 1.9 % at 0.01 (exact enumeration, both classes predicted half the time), 8.4 % on the pets windows.
- Kolmogorov-Smirnov p-values are exact for continuous data; with ties (a saturated top-class probability of
  1.0, identical image sizes) the statistic's null distribution is smaller than the continuous one, so the
  p-value is conservative.

Written here rather than taken from alibi-detect (Business Source License since 0.12) or TorchDrift (no
release since 2021): a permutation MMD is twenty lines of NumPy over one kernel matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fovea.monitor._reference import Observations
from fovea.monitor._stats import SQUARE, STATS

FAMILIES = ("embedding_mmd", "embedding_ks", "image_stats", "label_shift", "confidence", "unknown_rate")


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


def pooled_projection(reference: np.ndarray, window: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """Both samples projected on the first ``components`` principal components of the pooled sample, whitened.

    The mean, the components and the scale are fitted on reference and window together: a symmetric function
    of the pooled rows, so a permutation of reference and window labels leaves the projection unchanged and
    the tests downstream keep their exact null distribution. Components of (numerically) zero variance are
    dropped rather than divided by zero.

    Args:
        reference: (N, D) embeddings.
        window: (M, D) embeddings.
        components: how many components to keep at most.

    Returns:
        (N, k) and (M, k) whitened projections, k <= components.
    """
    pooled = np.concatenate([reference, window]).astype(np.float64)
    centred = pooled - pooled.mean(0)
    rows, dim = centred.shape
    # An eigendecomposition of the smaller of the covariance (D x D) and Gram (N x N) matrices rather than an
    # SVD of the data: the same components, faster. On the 2-core CPU with one BLAS thread: 1100 x 384 in
    # 13 ms against 52 ms, 2500 x 2048 in 1.3 s against 3.6 s. With OpenBLAS's two threads on a machine busy
    # with other work the SVD slowed most: 6 s against 0.05 s for 1100 x 384.
    gram = dim > rows
    eigval, eigvec = np.linalg.eigh(centred @ centred.T if gram else centred.T @ centred)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]  # largest first
    keep = min(components, int((eigval > eigval[0] * 1e-10).sum()) if eigval[0] > 0 else 0)
    sd = np.sqrt(eigval[:keep] / rows)  # each component's standard deviation over the pooled rows
    # Gram: the rows' coordinates are the eigenvectors scaled by the singular values (X V = U S)
    projected = eigvec[:, :keep] * np.sqrt(eigval[:keep]) if gram else centred @ eigvec[:, :keep]
    projected /= sd
    return projected[: len(reference)], projected[len(reference) :]


def _random_subsets(rng: np.random.Generator, count: int, total: int, size: int) -> np.ndarray:
    """(count, size) indexes: each row a uniformly random ``size``-subset of range(total)."""
    return rng.random((count, total)).argpartition(size - 1, axis=1)[:, :size] if size < total else \
        np.tile(np.arange(total), (count, 1))


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int = 1000,
                         seed: int = 0) -> tuple[float, float]:
    """(MMD², p-value) of samples x (n, d) and y (m, d) under a Gaussian kernel, by permutation of the pooled
    sample: p = (1 + #{permuted statistic >= observed}) / (1 + permutations).

    The bandwidth is the median squared distance over all pairs of the pooled sample (the median heuristic),
    a symmetric function of it, so the permutation null is exact. Each permutation's unbiased MMD² needs only
    the sums of the kernel over the smaller group's pairs and rows, which costs (smaller group)² per
    permutation instead of a product with the whole kernel matrix.

    Args:
        x: (n, d) first sample, n >= 2.
        y: (m, d) second sample, m >= 2.
        permutations: random reassignments of the pooled sample.
        seed: seeds the permutations.

    Returns:
        The unbiased MMD² and its permutation p-value.
    """
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"the MMD test needs at least 2 points per sample, got {n} and {m}")
    z = np.concatenate([x, y]).astype(np.float64)
    total = n + m
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    bandwidth = float(np.median(d2[np.triu_indices(total, 1)])) or 1.0  # the median heuristic
    k = np.exp(-d2 / bandwidth)
    np.fill_diagonal(k, 0)  # drop self-similarity: the statistic below is then the unbiased MMD²
    rows = k.sum(1)
    everything = rows.sum()
    small, large = min(n, m), max(n, m)  # MMD² is symmetric in the two samples: gather the smaller one

    def statistic(members: np.ndarray) -> np.ndarray:
        """Unbiased MMD² for each row of ``members`` (P, small): the indexes forming the smaller sample."""
        within = k[members[:, :, None], members[:, None, :]].sum((1, 2))  # sum over the small sample's pairs
        touching = rows[members].sum(1)  # sum of its rows: its pairs, and its pairs with the large sample
        across = touching - within
        rest = everything - 2 * touching + within  # the large sample's pairs
        return within / (small * (small - 1)) + rest / (large * (large - 1)) - 2 * across / (small * large)

    first = np.arange(n) if n <= m else np.arange(n, total)
    observed = float(statistic(first[None, :])[0])
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    chunk = max(1, 2_000_000 // (small * small))  # keeps the gathered (chunk, small, small) block near 16 MB
    for start in range(0, permutations, chunk):
        count = min(chunk, permutations - start)
        null[start : start + count] = statistic(_random_subsets(rng, count, total, small))
    return observed, float((1 + (null >= observed).sum()) / (1 + permutations))


def _ks_family(reference: list[np.ndarray], window: list[np.ndarray], names: list[str]) -> Test | None:
    """Kolmogorov-Smirnov per feature (each given as its reference and window values), Bonferroni-corrected."""
    from scipy.stats import ks_2samp

    rows = []
    for name, a, b in zip(names, reference, window):
        if not len(a) or not len(b) or (np.ptp(a) == 0 and np.ptp(b) == 0 and a[0] == b[0]):
            continue  # nothing recorded, or constant and equal (e.g. every image the same size): nothing to test
        # exact two-sample distribution (scipy's 'auto' for samples up to 10 000): exact for continuous data,
        # conservative with ties
        r = ks_2samp(a, b)
        rows.append((name, float(r.statistic), float(r.pvalue), float(np.median(a)), float(np.median(b))))
    if not rows:
        return None
    worst = min(rows, key=lambda t: t[2])
    detail = {name: {"ks": round(stat, 4), "p": p, "reference_median": ref_median, "window_median": win_median}
              for name, stat, p, ref_median, win_median in rows}
    return Test("", min(1.0, worst[2] * len(rows)), worst[1], {"worst": worst[0], "per_feature": detail})


def label_shift_test(reference: np.ndarray, window: np.ndarray, classes: int, *, permutations: int = 1000,
                     seed: int = 0) -> tuple[float, float, str]:
    """Two-sample test that two samples of class indexes come from the same class proportions.

    The reference is a sample too: its counts and the window's form a 2 x C contingency table, tested
    conditionally on its margins, which is exact at every sample size. Two classes: Fisher's exact test.
    More: a Monte-Carlo exact test, window counts drawn from the multivariate hypergeometric distribution
    the margins fix, ordered by the chi-square statistic, p = (1 + #{simulated >= observed}) / (1 + draws).

    The asymptotic chi-square p-value is not used, even with large expected counts: with reference 200 and
    window 40 (exact enumeration of every outcome) it flagged 5.28 % of normal windows at 0.05 when the two
    classes are predicted equally often, and 1.15 % at 0.01 when one is predicted 95 % of the time; Fisher's
    test 3.65 % and 0.42 %.

    Args:
        reference: (N,) class indexes (predicted labels) of the reference.
        window: (M,) class indexes of the window.
        classes: the number of classes.
        permutations: Monte-Carlo draws, for more than two classes.
        seed: seeds the draws.

    Returns:
        (p-value, chi-square statistic of the table, the method used).
    """
    from scipy.stats import fisher_exact

    table = np.stack([np.bincount(reference, minlength=classes), np.bincount(window, minlength=classes)])
    table = table[:, table.sum(0) > 0]  # a class neither sample predicted says nothing
    totals = table.sum(0)
    n_ref, n_win = int(table[0].sum()), int(table[1].sum())
    if table.shape[1] < 2 or not n_ref or not n_win:
        return 1.0, 0.0, "nothing to compare (one class predicted, or an empty sample)"

    def chi_square(win: np.ndarray) -> np.ndarray:
        """The Pearson statistic of each table whose window row is a row of ``win`` (margins fixed)."""
        expected_win = totals * (n_win / (n_ref + n_win))
        expected_ref = totals - expected_win
        return (((win - expected_win) ** 2 / expected_win).sum(-1)
                + (((totals - win) - expected_ref) ** 2 / expected_ref).sum(-1))

    observed = float(chi_square(table[1].astype(np.float64)))
    if table.shape[1] == 2:
        return float(fisher_exact(table).pvalue), observed, "Fisher's exact test"
    draws = np.random.default_rng(seed).multivariate_hypergeometric(totals, n_win, size=permutations)
    null = chi_square(draws.astype(np.float64))
    # the same table can give a slightly different float in another summation order: count it as a tie
    p = (1 + (null >= observed * (1 - 1e-9)).sum()) / (1 + permutations)
    return float(p), observed, f"Monte-Carlo exact chi-square ({permutations} draws)"


def _unknown_rate(reference: Observations, window: Observations, threshold: float) -> Test | str:
    """Fisher's exact test of the share of images over the unknown threshold; why not, when it cannot run."""
    if reference.unknown_scores is None:
        return "the reference has no unknown scores (built before the model had them)"
    if window.unknown_scores is None:
        return "the window has no unknown scores (answers logged without them)"
    ref, win = reference.unknown_scores, window.unknown_scores
    win = win[np.isfinite(win)]  # answers logged without a score
    if len(win) < 10:
        return f"only {len(win)} answers in the window have an unknown score"
    ref_over, win_over = (ref > threshold).astype(np.int64), (win > threshold).astype(np.int64)
    p, stat, method = label_shift_test(ref_over, win_over, 2)
    return Test("unknown_rate", p, stat, {"method": method, "threshold": threshold,
                                          "reference": round(float(ref_over.mean()), 4),
                                          "window": round(float(win_over.mean()), 4)})


def detect(reference: Observations, window: Observations, classes: list[str], *, alpha: float = 0.05,
           max_reference: int = 500, components: int = 16, permutations: int = 1000, seed: int = 0,
           unknown_threshold: float | None = None) -> DriftResult:
    """Test ``window`` against ``reference`` with every family the two samples allow.

    Args:
        reference: the reference sample (validation images at training).
        window: the window of traffic to test, at least 10 images.
        classes: the model's class names.
        alpha: the false-alarm level of the overall verdict (and of each family's flag).
        max_reference: at most this many reference images enter the MMD test (a seeded random subset,
            chosen without looking at the window); its kernel matrix grows with the square of the pooled size.
        components: principal components of the pooled embeddings that the embedding tests use.
        permutations: for the MMD permutation test and the Monte-Carlo label test.
        seed: seeds the subset and the permutations.
        unknown_threshold: the model's unknown threshold (None: a closed-set model, no unknown_rate family).

    Returns:
        One test per family that could run, and the Bonferroni-combined verdict.
    """
    from scipy.stats import ks_2samp

    if len(window) < 10:
        raise ValueError(f"a window needs at least 10 images to test, got {len(window)}")
    rng = np.random.default_rng(seed)
    ref_idx = np.arange(len(reference))
    if len(ref_idx) > max_reference:
        ref_idx = np.sort(rng.choice(len(ref_idx), max_reference, replace=False))
    tests: list[Test] = []
    skipped: dict[str, str] = {}

    if reference.embeddings is not None and window.embeddings is not None:
        # fitted on the whole reference and the window: still a symmetric function of the rows the KS tests
        # compare, and, because the MMD subset is drawn at random from the reference, of the rows it compares
        a, b = pooled_projection(reference.embeddings, window.embeddings, components)
        if a.shape[1]:
            stat, p = mmd_permutation_test(a[ref_idx], b, permutations, seed)
            tests.append(Test("embedding_mmd", p, stat, {"components": a.shape[1], "permutations": permutations,
                                                         "projection": "pooled principal components"}))
            names = [f"pc{i + 1}" for i in range(a.shape[1])]
            ks = _ks_family(list(a.T), list(b.T), names)
            if ks is not None:
                ks.family = "embedding_ks"
                tests.append(ks)
        else:
            skipped["embedding_mmd"] = skipped["embedding_ks"] = "the embeddings are all identical"
    else:
        why = "no embeddings in the reference" if reference.embeddings is None else "no embeddings in the window"
        skipped["embedding_mmd"] = skipped["embedding_ks"] = why + " (an ONNX or torch.export model exposes none)"

    # Only recorded values are compared, on both sides: the header's width, height and aspect are 0 where they
    # were not recorded (an unreadable header), and a logged answer without statistics has NaN for all of them,
    # so a missing value in the window is never a brightness or a size of 0.
    ref_cols, win_cols = [], []
    for j in range(len(STATS)):
        a_j, b_j = reference.stats[:, j], window.stats[:, j]
        a_j, b_j = a_j[np.isfinite(a_j)], b_j[np.isfinite(b_j)]
        if j >= SQUARE:
            a_j, b_j = a_j[a_j > 0], b_j[b_j > 0]
        ref_cols.append(a_j)
        win_cols.append(b_j)
    img = _ks_family(ref_cols, win_cols, list(STATS))
    if img is not None:
        img.family = "image_stats"
        tests.append(img)

    c = len(classes)
    p_label, chi, method = label_shift_test(reference.predicted, window.predicted, c, permutations=permutations,
                                            seed=seed)
    ref_counts, win_counts = np.bincount(reference.predicted, minlength=c), np.bincount(window.predicted, minlength=c)
    tests.append(Test("label_shift", p_label, chi,
                      {"method": method,
                       "reference": {k: round(float(v) / max(1, len(reference)), 4) for k, v in zip(classes, ref_counts)},
                       "window": {k: round(float(v) / max(1, len(window)), 4) for k, v in zip(classes, win_counts)}}))

    if unknown_threshold is not None:
        test = _unknown_rate(reference, window, unknown_threshold)
        if isinstance(test, Test):
            tests.append(test)
        else:
            skipped["unknown_rate"] = test

    conf = ks_2samp(reference.confidence, window.confidence)
    tests.append(Test("confidence", float(conf.pvalue), float(conf.statistic),
                      {"reference_mean": float(reference.confidence.mean()), "window_mean": float(window.confidence.mean())}))

    p = min(1.0, min(t.p_value for t in tests) * len(tests))
    return DriftResult(len(reference), len(window), alpha, tests, p, p < alpha, skipped)
