"""False-alarm rate of ``fovea.monitor.detect`` on normal windows of real photos (issue 15), with its binomial
95 % interval, per family and overall, for references of 200 and 1000 images and windows of 40 and 100.

1. Train (or reuse, ``--model RUN``) a pets ``cnn`` at Fovea's CPU defaults, as
   ``fovea train DATA/pets --model cnn --out bench-work/pets-cnn`` does.
2. Observe, through the artifact (``fovea.load(run)``, ``observe_files``: probabilities, embeddings, image
   statistics), every image of pets/val (the images the best epoch was chosen on, which ``fovea train`` saves
   as the reference) and of pets-extra (3000 photos of the same source the model never saw); cached in --work.
3. Per configuration, ``--windows`` draws: a reference (a random subset of pets/val of that size; for 1000 it
   is all of pets/val) and a window (a random subset of pets-extra), tested with ``detect`` at alpha 0.05.
4. ``--control``: the same draws with the reference taken from one half of pets-extra and the windows from
   the other, and the whole of pets/val against the whole of pets-extra, to measure whether selecting the
   model on pets/val makes fresh images look drifted against it.
5. ``--old-commit SHA``: the same draws through ``src/fovea/monitor/_drift.py`` as it was at that commit.

Every family and the overall rate pass when the lower end of its Clopper-Pearson interval is at most alpha
(the exit status is 1 otherwise).

    nice -n 10 .venv/bin/python bench/drift_calibration.py --model bench-work/pets-cnn
    nice -n 10 .venv/bin/python bench/drift_calibration.py --model bench-work/pets-cnn --control --old-commit 29b3b3e
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("embedding_mmd", "embedding_ks", "image_stats", "label_shift", "confidence")


def observed(run: Path, folders: list[Path], work: Path) -> tuple[Any, np.ndarray, bool]:
    """(Observations, true labels, whether it came from the cache) of every image under ``folders`` (CLASS/*.jpg)
    through the artifact ``run``; cached in ``work``, keyed by the paths and the model file's time."""
    import fovea
    from fovea.monitor import Observations, observe_files

    model = fovea.load(run, "cpu")
    paths = [p for f in folders for c in model.classes for p in sorted((f / c).glob("*.jpg"))]
    labels = np.array([model.classes.index(p.parent.name) for p in paths])
    key = hashlib.sha256(("\n".join(map(str, paths)) + str((run / "model.json").stat().st_mtime)).encode()).hexdigest()
    cache = work / f"observed-{key[:16]}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return Observations(z["probabilities"], z["stats"], z["embeddings"]), labels, True
    sample, bad = observe_files(model, paths)
    if bad or sample.embeddings is None:
        raise SystemExit(f"unreadable images: {bad[:3]}" if bad else f"{run} exposes no embedding")
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, probabilities=sample.probabilities, stats=sample.stats, embeddings=sample.embeddings)
    return sample, labels, False


def subset(sample: Any, idx: np.ndarray) -> Any:
    from fovea.monitor import Observations

    return Observations(sample.probabilities[idx], sample.stats[idx], sample.embeddings[idx])


def old_detect(commit: str) -> Callable[..., Any]:
    """``detect`` from ``src/fovea/monitor/_drift.py`` at ``commit`` (it imports the current package's helpers)."""
    source = subprocess.run(["git", "show", f"{commit}:src/fovea/monitor/_drift.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_drift.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_drift", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_drift"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.detect  # type: ignore[no-any-return]


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return float(ci.low), float(ci.high)


def draws(detect: Callable[..., Any], reference: Any, window_pool: Any, classes: list[str], ref_size: int,
          win_size: int, windows: int, seed: int, alpha: float, permutations: int) -> dict[str, int]:
    """False alarms per family and overall over ``windows`` draws; the draws depend only on the seed and sizes."""
    rng = np.random.default_rng([seed, ref_size, win_size])
    alarms = dict.fromkeys((*FAMILIES, "overall"), 0)
    for _ in range(windows):
        ref_idx = np.sort(rng.choice(len(reference), ref_size, replace=False))
        win_idx = np.sort(rng.choice(len(window_pool), win_size, replace=False))
        r = detect(subset(reference, ref_idx), subset(window_pool, win_idx), classes, alpha=alpha,
                   permutations=permutations, seed=int(rng.integers(2**31)))
        for t in r.tests:
            alarms[t.family] += t.p_value < alpha
        alarms["overall"] += r.drift
    return alarms


def table(title: str, rows: list[tuple[int, int, dict[str, int]]], windows: int, alpha: float) -> bool:
    print(f"\n{title}\n")
    print("| reference | window | family | false alarms | rate | 95 % interval (Clopper-Pearson) | level kept |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for ref_size, win_size, alarms in rows:
        for family, k in alarms.items():
            low, high = clopper_pearson(k, windows)
            kept = low <= alpha
            ok &= kept
            print(f"| {ref_size} | {win_size} | {family} | {k}/{windows} | {k / windows:.1%} | "
                  f"{low:.1%} – {high:.1%} | {'yes' if kept else 'NO'} |")
    return ok


def selection_check(model_run: Path, val: Any, val_labels: np.ndarray, extra: Any, extra_labels: np.ndarray,
                    classes: list[str], permutations: int) -> None:
    """The whole of pets/val (the reference's pool, the images the model was selected on) against the whole of
    pets-extra (fresh images): accuracy, confidence, and every family at full size."""
    from scipy.stats import fisher_exact

    from fovea.monitor import detect

    acc_v = val.predicted == val_labels
    acc_e = extra.predicted == extra_labels
    p_acc = fisher_exact([[acc_v.sum(), (~acc_v).sum()], [acc_e.sum(), (~acc_e).sum()]]).pvalue
    print(f"\nselection check ({model_run}): accuracy pets/val {acc_v.mean():.1%} ({len(acc_v)}), pets-extra "
          f"{acc_e.mean():.1%} ({len(acc_e)}), Fisher p = {p_acc:.3g}; mean confidence {val.confidence.mean():.4f} "
          f"against {extra.confidence.mean():.4f}")
    r = detect(val, extra, classes, max_reference=len(val), permutations=permutations)
    print("all of pets/val against all of pets-extra: "
          + ", ".join(f"{t.family} p = {t.p_value:.3g}" for t in r.tests) + f"; overall p = {r.p_value:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, nargs="?", default=REPO.parent / "shared" / "data",
                    help="the folder holding pets/ and pets-extra/ (default: ../shared/data)")
    ap.add_argument("--model", type=Path, default=None, help="a pets run to use instead of training one")
    ap.add_argument("--work", type=Path, default=REPO / "bench-work" / "drift")
    ap.add_argument("--windows", type=int, default=500, help="normal windows per configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--references", default="200,1000", help="reference sizes (at most 1000, the size of pets/val)")
    ap.add_argument("--window-sizes", default="40,100")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--control", action="store_true", help="also the selection check (reference from pets-extra)")
    ap.add_argument("--old-commit", default=None, help="also run the draws through detect as of this commit")
    args = ap.parse_args()

    import fovea
    from fovea.monitor import detect

    try:
        from fovea._system import hardware
    except ImportError:  # before the move out of fovea.compress
        from fovea.compress._measure import hardware  # type: ignore[no-redef,attr-defined]

    clock = time.perf_counter()
    run = args.model or args.work / "pets-cnn"
    if not (run / "model.json").exists():
        t0 = time.perf_counter()
        fovea.train(args.data / "pets", model="cnn", out=str(run), progress=False)
        print(f"trained {run} in {time.perf_counter() - t0:.0f} s")
    classes = list(fovea.load(run, "cpu").classes)
    t0 = time.perf_counter()
    val, val_labels, cached = observed(run, [args.data / "pets" / "val"], args.work)
    extra, extra_labels, cached_too = observed(run, [args.data / "pets-extra"], args.work)
    print(f"machine: {hardware().summary()}")
    print(f"model: {run} ({classes}, embedding {val.embeddings.shape[1]}-d); observed {len(val)} pets/val and "
          f"{len(extra)} pets-extra images in {time.perf_counter() - t0:.0f} s"
          + (" (from the cache in --work)" if cached and cached_too else ""))
    print(f"command: {' '.join(sys.argv)}")
    configs = [(r, w) for r in map(int, args.references.split(",")) for w in map(int, args.window_sizes.split(","))]

    def sweep(fn: Callable[..., Any], reference: Any, pool: Any, title: str) -> bool:
        t0 = time.perf_counter()
        rows = [(r, w, draws(fn, reference, pool, classes, r, w, args.windows, args.seed, args.alpha,
                             args.permutations)) for r, w in configs]
        ok = table(f"{title} ({args.windows} windows each, alpha {args.alpha}, seed {args.seed}; "
                   f"{time.perf_counter() - t0:.0f} s)", rows, args.windows, args.alpha)
        return ok

    ok = sweep(detect, val, extra, "reference from pets/val, windows from pets-extra")
    if args.control:
        half = np.random.default_rng(args.seed).permutation(len(extra))
        a, b = subset(extra, np.sort(half[: len(extra) // 2])), subset(extra, np.sort(half[len(extra) // 2 :]))
        sweep(detect, a, b, "control: reference from one half of pets-extra, windows from the other")
        selection_check(run, val, val_labels, extra, extra_labels, classes, args.permutations)
    if args.old_commit:
        sweep(old_detect(args.old_commit), val, extra, f"the code as of {args.old_commit} (before issue 15)")
    print(f"\nthe current code, every family and overall at or under {args.alpha:.0%} within its interval: "
          f"{'yes' if ok else 'NO'}")
    print(f"total {time.perf_counter() - clock:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
