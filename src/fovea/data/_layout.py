"""Find the images and labels in what the user pointed at.

Three layouts are understood:
- ``DATA/{train, val|valid|validation, [test]}/CLASS/*`` - the split is the user's;
- ``DATA/CLASS/*`` (or a split layout with only ``train``) - a stratified, seeded split;
- a CSV with ``path,label[,group]`` (paths relative to the CSV) - split by group when given, so one
  group (patient, camera, source) never lands in two splits.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fovea.errors import FoveaError

log = logging.getLogger(__name__)

VAL_NAMES = ("val", "valid", "validation")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    group: str | None = None


@dataclass
class Dataset:
    """Where a data set's files are and which split each belongs to."""

    root: str
    layout: str  # "splits" | "folders" | "csv"
    classes: list[str]
    splits: dict[str, list[Sample]]
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): CSV rows with no file
    corrections: dict[str, object] | None = None  # people's verdicts applied (fovea.data.corrected): file, counts

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {c: n for c, n in zip(self.classes, _count(samples, len(self.classes)))}
            for split, samples in self.splits.items()
        }

    def fingerprint(self) -> str:
        """Hash of the sorted (split, path, label) list and file sizes: changes when the data does."""
        h = hashlib.sha256()
        for split in sorted(self.splits):
            for s in sorted(self.splits[split], key=lambda s: s.path):
                size = Path(s.path).stat().st_size if Path(s.path).exists() else -1
                h.update(f"{split}\0{Path(s.path).name}\0{self.classes[s.label]}\0{size}\n".encode())
        return h.hexdigest()[:16]


def _count(samples: list[Sample], n: int) -> list[int]:
    c = Counter(s.label for s in samples)
    return [c.get(i, 0) for i in range(n)]


def _is_candidate(p: Path) -> bool:
    # Every visible file is a candidate: a non-image with an image name must be quarantined, not skipped.
    # A broken symbolic link is one too: quarantined as unreadable, never silently left out of the counts.
    return ((p.is_file() or (p.is_symlink() and not p.exists())) and not p.name.startswith(".")
            and p.name not in ("Thumbs.db", "desktop.ini"))


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _scan_classes(root: Path, classes: list[str] | None = None) -> tuple[list[str], dict[str, list[Path]]]:
    dirs = _class_dirs(root)
    found = {d.name: sorted(p for p in d.rglob("*") if _is_candidate(p)) for d in dirs}
    if classes is None:
        classes = list(found)
    return classes, found


def _check_classes(classes: list[str], files: dict[str, list[Path]], where: Path) -> None:
    if len(classes) == 0:
        raise FoveaError(
            f"no class folders in {where}. Expected DATA/CLASS/*.jpg, DATA/train/CLASS/*.jpg or a CSV path,label"
        )
    if len(classes) == 1:
        raise FoveaError(
            f"only one class ('{classes[0]}') in {where}: a classifier needs at least two class folders"
        )
    empty = [c for c in classes if not files.get(c)]
    if empty:
        raise FoveaError(
            f"class folder(s) with no files in {where}: {', '.join(empty)}. Add images or remove the folder(s)"
        )


def stratified_split(
    items: list[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split per class (or per group when every item has one), seeded; every class keeps >= 1 train item."""
    if not 0.0 < val_fraction < 1.0:
        raise FoveaError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    rng = random.Random(seed)
    if items and all(s.group is not None for s in items):
        return _group_split(items, val_fraction, rng)
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for s in sorted(items, key=lambda s: s.path):
        by_label[s.label].append(s)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_val = min(len(group) - 1, round(len(group) * val_fraction))
        val += group[:n_val]
        train += group[n_val:]
    if items and not val:
        raise FoveaError(f"--val-fraction {val_fraction:g} of {len(items)} images leaves no validation image; "
                         "raise it, or give a val split")
    return train, val


def _group_split(items: list[Sample], val_fraction: float, rng: random.Random) -> tuple[list[Sample], list[Sample]]:
    """Whole groups go to val (seeded order) until it holds ``val_fraction`` of the items.

    A group is moved only if train keeps at least one item of every class without it; a data set with
    too few groups for that is a clear error rather than an empty or one-sided training split.
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in items:
        groups[str(s.group)].append(s)
    if len(groups) < 2:
        raise FoveaError(f"only one group ({next(iter(groups))!r}) in the CSV: a group-aware split needs at least "
                         "two; add a split column (train/val) or more groups")
    names = sorted(groups)
    rng.shuffle(names)
    target = val_fraction * len(items)
    left = Counter(s.label for s in items)  # items of each class still in train
    val_names: set[str] = set()
    n_val = 0
    for name in names:
        if n_val >= target:
            break
        counts = Counter(s.label for s in groups[name])
        if any(left[c] - k < 1 for c, k in counts.items()):
            continue  # train would lose its last example of a class
        val_names.add(name)
        left.subtract(counts)
        n_val += len(groups[name])
    if not val_names:
        raise FoveaError(f"cannot split {len(groups)} groups into train and val without leaving a class out of "
                         "train; add a split column (train/val) or more groups")
    train = [s for n in names if n not in val_names for s in groups[n]]
    val = [s for n in names if n in val_names for s in groups[n]]
    return train, val


def with_groups(samples: list[Sample], regex: str | None) -> list[Sample]:
    """Give every sample a group from its file name: the regex's first capture group, or its whole match
    (``--group-regex '^(P\\d+)_'`` puts P017_a.png and P017_b.png in group P017). A file the regex does
    not match is a group of its own. Samples that already have a group (a CSV column) keep it."""
    if regex is None:
        return samples
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise FoveaError(f"--group-regex {regex!r} is not a valid regular expression: {e}") from e
    out = []
    for s in samples:
        if s.group is not None:
            out.append(s)
            continue
        name = Path(s.path).name
        m = pattern.search(name)
        group = (m.group(1) if m.groups() and m.group(1) is not None else m.group(0)) if m else name
        out.append(dataclasses.replace(s, group=group))
    if samples and all(Path(s.path).name == s.group for s in out):
        raise FoveaError(f"--group-regex {regex!r} matches none of the file names (e.g. {Path(samples[0].path).name})")
    return out


def _from_csv(path: Path, val_fraction: float, seed: int, group_regex: str | None = None) -> Dataset:
    if path.suffix.lower() != ".csv":
        raise FoveaError(f"{path} is a file but not a .csv; give a folder of class folders or a CSV with path,label")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "path" not in fields or "label" not in fields:
                raise FoveaError(f"{path}: the CSV needs a header with 'path' and 'label' columns (and optionally "
                                 f"'group'), found {fields}")
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError as e:
        raise FoveaError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save the CSV as UTF-8") from None
    except csv.Error as e:
        raise FoveaError(f"{path}: not a readable CSV: {e}") from None
    if not rows:
        raise FoveaError(f"{path}: the CSV has no rows")
    classes = sorted({r["label"] for r in rows if r["label"]})
    index = {c: i for i, c in enumerate(classes)}
    samples: list[Sample] = []
    missing: list[tuple[str, str]] = []
    explicit: dict[str, list[Sample]] = defaultdict(list)
    for r in rows:
        p = Path(r["path"])
        p = p if p.is_absolute() else path.parent / p
        if not r["label"]:
            missing.append((str(p), "no label in CSV"))
            continue
        if not p.is_file():
            missing.append((str(p), "file listed in CSV does not exist"))
            continue
        s = Sample(str(p), index[r["label"]], r.get("group") or None)
        split = r.get("split", "").lower()
        if split:
            if split not in ("train", "test", *VAL_NAMES):
                raise FoveaError(f"{path}: split {r.get('split')!r} for {r['path']}; the split column takes train, "
                                 "val (or valid, validation) or test")
            explicit["val" if split in VAL_NAMES else split].append(s)
        else:
            samples.append(s)
    if group_regex:
        samples = with_groups(samples, group_regex)
        explicit = defaultdict(list, {k: with_groups(v, group_regex) for k, v in explicit.items()})
    files = defaultdict(list)
    for s in samples + [s for v in explicit.values() for s in v]:
        files[classes[s.label]].append(Path(s.path))
    _check_classes(classes, files, path)
    if explicit:
        splits = dict(explicit)
        if samples:
            splits.setdefault("train", []).extend(samples)
        if not splits.get("train"):
            raise FoveaError(f"{path}: no row has split 'train' (or an empty split): nothing to train on")
        if not splits.get("val"):  # as a split layout without val/: held out from train
            splits["train"], splits["val"] = stratified_split(splits["train"], val_fraction, seed)
    else:
        train, val = stratified_split(samples, val_fraction, seed)
        splits = {"train": train, "val": val}
    return Dataset(str(path), "csv", classes, splits, missing)


def discover(data: str | Path, val_fraction: float = 0.2, seed: int = 0, group_regex: str | None = None) -> Dataset:
    """Find classes, files and splits in ``data`` (a folder or a CSV). Raises FoveaError with advice.

    ``group_regex`` gives each file a group from its name (see ``with_groups``): a split made here keeps
    every group in one split, and ``fovea check`` flags a group found in two of the user's splits.
    """
    root = Path(data).expanduser()
    if not root.exists():
        raise FoveaError(f"{root} does not exist")
    if not 0.0 < val_fraction < 1.0:  # checked even where the data has its own val split: a typo is a typo
        raise FoveaError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return _from_csv(root, val_fraction, seed, group_regex)
        raise FoveaError(f"{root} is a file; give a folder of class folders or a CSV with path,label")
    sub = {p.name.lower(): p for p in _class_dirs(root)}
    if "train" in sub:
        beside = sorted(p.name for n, p in sub.items() if n not in ("train", "test", *VAL_NAMES))
        if beside:  # e.g. a class folder left next to the splits: say so rather than drop it unseen
            log.warning("%s: folder(s) beside train/val/test ignored: %s", root, ", ".join(beside))
        classes, train_files = _scan_classes(sub["train"])
        _check_classes(classes, train_files, sub["train"])
        index = {c: i for i, c in enumerate(classes)}

        def samples_of(files: dict[str, list[Path]], where: Path) -> list[Sample]:
            unknown = sorted(set(files) - set(index))
            if unknown:
                raise FoveaError(f"{where} has class folder(s) not in train: {', '.join(unknown)}")
            return with_groups([Sample(str(p), index[c], None) for c in classes for p in files.get(c, [])], group_regex)

        splits = {"train": samples_of(train_files, sub["train"])}
        val_dir = next((sub[n] for n in VAL_NAMES if n in sub), None)
        if val_dir is not None:
            splits["val"] = samples_of(_scan_classes(val_dir)[1], val_dir)
        else:
            splits["train"], splits["val"] = stratified_split(splits["train"], val_fraction, seed)
        if "test" in sub:
            splits["test"] = samples_of(_scan_classes(sub["test"])[1], sub["test"])
        return Dataset(str(root), "splits", classes, splits)
    classes, files = _scan_classes(root)
    _check_classes(classes, files, root)
    allsamples = with_groups([Sample(str(p), i, None) for i, c in enumerate(classes) for p in files[c]], group_regex)
    train, val = stratified_split(allsamples, val_fraction, seed)
    return Dataset(str(root), "folders", classes, {"train": train, "val": val})


def eval_samples(data: str | Path, classes: list[str]) -> tuple[list[Sample], list[tuple[str, str]], str]:
    """Samples to evaluate on: the test (else val) split of a split layout, or every image of a class tree.

    Class names are matched to the model's; a folder of a class the model does not know is an error.
    Returns (samples, missing, which split was used).
    """
    root = Path(data).expanduser()
    if not root.exists():
        raise FoveaError(f"{root} does not exist")
    index = {c: i for i, c in enumerate(classes)}
    if root.is_file():
        ds = _from_csv(root, 0.5, 0)
        samples = [Sample(s.path, index[ds.classes[s.label]], s.group)
                   for v in ds.splits.values() for s in v if ds.classes[s.label] in index]
        return samples, ds.missing, "csv"
    sub = {p.name.lower(): p for p in _class_dirs(root)}
    used = "all"
    if "test" in sub or any(n in sub for n in VAL_NAMES) or "train" in sub:
        name = "test" if "test" in sub else next((n for n in VAL_NAMES if n in sub), None)
        if name is None:
            raise FoveaError(f"{root} has a train split but no val/test split to evaluate on")
        root, used = sub[name], name
    _, files = _scan_classes(root)
    unknown = sorted(set(files) - set(index))
    if unknown:
        raise FoveaError(f"{root} has class folder(s) the model does not know: {', '.join(unknown)} (model classes: {', '.join(classes)})")
    samples = [Sample(str(p), index[c], None) for c in classes for p in files.get(c, [])]
    if not samples:
        loose = any(_is_candidate(p) for p in root.iterdir())
        raise FoveaError(f"{root} holds files but no class folders: evaluation needs the true labels, as CLASS/* "
                         f"folders named like the model's classes ({', '.join(classes)}); `fovea predict` labels "
                         "images without them" if loose else f"no files to evaluate in {root}")
    return samples, [], used


def kfold(ds: Dataset, k: int, seed: int = 0) -> list[Dataset]:
    """K cross-validation data sets: train and val pooled, then split into k stratified folds (grouped
    when every sample has a group, so a group is never in two folds); a test split stays out of all.

    scikit-learn's StratifiedKFold / StratifiedGroupKFold do the assignment.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    pool = sorted(ds.splits.get("train", []) + ds.splits.get("val", []), key=lambda s: s.path)
    labels = [s.label for s in pool]
    smallest = min(Counter(labels).values())
    if k < 2:
        raise FoveaError(f"--folds needs at least 2 folds, got {k}")
    grouped = bool(pool) and all(s.group is not None for s in pool)
    if grouped:
        n_groups = len({s.group for s in pool})
        if n_groups < k:
            raise FoveaError(f"--folds {k}: only {n_groups} groups; each fold needs at least one")
        splitter: object = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = splitter.split(pool, labels, [str(s.group) for s in pool])  # type: ignore[attr-defined]
    else:
        if smallest < k:
            raise FoveaError(f"--folds {k}: the smallest class has {smallest} images; use at most {smallest} folds")
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(pool, labels)
    out = []
    for train_idx, val_idx in folds:
        splits = {"train": [pool[i] for i in train_idx], "val": [pool[i] for i in val_idx]}
        if "test" in ds.splits:
            splits["test"] = ds.splits["test"]
        if len({pool[i].label for i in train_idx}) < len(ds.classes):
            raise FoveaError(f"--folds {k}: a fold's training part lacks a class (too few groups per class); use fewer folds")
        out.append(Dataset(ds.root, ds.layout, ds.classes, splits, ds.missing))
    return out
