"""``fovea check`` on a messy folder of real photos: counts, imbalance, bad files, duplicates, leakage, advice."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_subset
from PIL import Image
from typer.testing import CliRunner

from fovea.cli import app
from fovea.cli._render import check_report as print_report
from fovea.data import check
from fovea.errors import FoveaError


def photos(pets_root: Path, cls: str, n: int) -> list[Path]:
    return sorted((pets_root / "train" / cls).glob("*.jpg"))[:n]


def copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory, pets_root: Path) -> Path:
    """train: 9 cats, 3 dogs (3:1); val: 2 cats + an exact copy of a train cat, 1 dog + a re-encoded,
    resized train dog; and three unusable files (empty, text named .jpg, truncated JPEG)."""
    root = tmp_path_factory.mktemp("messy")
    cats, dogs = photos(pets_root, "cat", 11), photos(pets_root, "dog", 4)
    for p in cats[:9]:
        copy(p, root / "train" / "cat" / p.name)
    for p in dogs[:3]:
        copy(p, root / "train" / "dog" / p.name)
    for p in cats[9:11]:
        copy(p, root / "val" / "cat" / p.name)
    copy(dogs[3], root / "val" / "dog" / dogs[3].name)
    copy(cats[0], root / "val" / "cat" / "copy_of_train_cat.jpg")  # exact duplicate across splits
    im = Image.open(dogs[1])
    im.resize((im.width * 9 // 10, im.height * 9 // 10)).save(root / "val" / "dog" / "reshot_dog.jpg", quality=60)
    (root / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (root / "train" / "dog" / "notes.jpg").write_text("shopping list: cat food\n")
    data = cats[1].read_bytes()
    (root / "val" / "cat" / "cut.jpg").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(scope="module")
def report(messy: Path) -> dict[str, Any]:
    return check(messy, progress=False)


def advice_with(r: dict[str, Any], text: str) -> str:
    hits = [tip for tip in r["advice"] if text in tip]
    assert len(hits) == 1, f"no single piece of advice mentions {text!r}: {r['advice']}"
    return hits[0]


def leak_names(group: dict[str, Any]) -> list[tuple[str, str, str]]:
    return sorted((f["split"], f["label"], Path(f["path"]).name) for f in group["files"])


# ----------------------------------------------------------------------------------------------- contents


def test_counts_per_split_and_class(report: dict[str, Any], messy: Path) -> None:
    assert report["layout"] == "splits" and report["classes"] == ["cat", "dog"]
    assert report["data"] == str(messy)
    assert report["files"] == 20 and report["usable"] == 17
    assert report["counts"] == {"train": {"cat": 10, "dog": 4}, "val": {"cat": 4, "dog": 2}}
    assert report["usable_counts"] == {"train": {"cat": 9, "dog": 3}, "val": {"cat": 3, "dog": 2}}


def test_sizes_modes_formats(report: dict[str, Any]) -> None:
    s = report["sizes"]
    assert s["min"] == [162, 162] and s["max"] == [180, 180] and s["median"] == [180, 180]
    assert s["distinct"] == 2 and s["smaller_than_64px"] == 0
    assert s["aspect_min"] == s["aspect_max"] == 1.0
    assert report["modes"] == {"RGB": 17}
    assert report["formats"] == {"JPEG": 17}


def test_imbalance_is_measured_and_flagged(report: dict[str, Any]) -> None:
    assert report["imbalance"] == {"train": 3.0, "val": 1.5}
    tip = advice_with(report, "imbalanced")
    assert "3.0:1 in train" in tip and "balanced accuracy" in tip


def test_unusable_files_are_listed_with_reasons(report: dict[str, Any]) -> None:
    q = {Path(x["path"]).name: x for x in report["quarantined"]}
    assert set(q) == {"empty.jpg", "notes.jpg", "cut.jpg"}
    assert "empty" in q["empty.jpg"]["reason"] and q["empty.jpg"]["split"] == "train"
    assert "not an image" in q["notes.jpg"]["reason"] and q["notes.jpg"]["split"] == "train"
    assert "truncated" in q["cut.jpg"]["reason"] and q["cut.jpg"]["split"] == "val"
    assert "3 file(s) cannot be used" in advice_with(report, "cannot be used")


def test_exact_duplicate_across_splits_is_leakage(report: dict[str, Any], pets_root: Path) -> None:
    (group,) = report["exact_duplicates"]
    first_cat = photos(pets_root, "cat", 1)[0].name
    assert leak_names(group) == [("train", "cat", first_cat), ("val", "cat", "copy_of_train_cat.jpg")]
    assert group["cross_split"] and not group["conflicting_labels"]
    assert report["leakage"]["exact"] == 1


def test_re_encoded_resized_photo_is_a_near_duplicate(report: dict[str, Any], pets_root: Path) -> None:
    (group,) = report["near_duplicates"]
    original = photos(pets_root, "dog", 2)[1].name
    assert leak_names(group) == [("train", "dog", original), ("val", "dog", "reshot_dog.jpg")]
    assert group["cross_split"] and not group["conflicting_labels"]
    assert report["leakage"]["near"] == 1
    tip = advice_with(report, "inflated")
    assert "1 exact and 1 near-duplicate" in tip


def test_small_classes_are_flagged(report: dict[str, Any]) -> None:
    tips = [t for t in report["advice"] if "fewer than 10" in t]
    assert len(tips) == 2
    assert any(t.startswith("train:") and "(cat, dog)" in t for t in tips)
    assert any(t.startswith("val:") and "(cat, dog)" in t for t in tips)


def test_report_is_json_ready(report: dict[str, Any]) -> None:
    assert json.loads(json.dumps(report)) == report


def test_a_clean_data_set_has_no_problems(tmp_path: Path, pets_root: Path) -> None:
    r = check(make_subset(tmp_path, 10, 10, pets_root), progress=False)
    assert r["advice"] == ["no problems found."]
    assert r["quarantined"] == [] and r["exact_duplicates"] == [] and r["near_duplicates"] == []
    assert r["leakage"] == {"exact": 0, "near": 0, "groups": []}
    assert r["imbalance"] == {"train": 1.0, "val": 1.0}


def test_duplicates_with_different_labels_are_called_out(tmp_path: Path, pets_root: Path) -> None:
    root = make_subset(tmp_path, 10, 10, pets_root)
    cat = photos(pets_root, "cat", 1)[0]
    copy(cat, root / "train" / "dog" / "not_a_dog.jpg")
    r = check(root, progress=False)
    (group,) = r["exact_duplicates"]
    assert group["conflicting_labels"] and not group["cross_split"]
    assert advice_with(r, "different labels").startswith("1 duplicate group")
    assert advice_with(r, "inside one split")


def test_near_duplicate_threshold(tmp_path: Path, pets_root: Path) -> None:
    """A brighter PNG of a JPEG photo is found inside one split (not leakage); the threshold bounds the search."""
    root = make_subset(tmp_path, 3, 0, pets_root)
    src = photos(pets_root, "cat", 1)[0]
    arr = np.asarray(Image.open(src)).astype(int)
    Image.fromarray(np.clip(arr + 40, 0, 255).astype(np.uint8)).save(root / "train" / "cat" / "brighter.png")
    default = check(root, progress=False)
    assert len(default["near_duplicates"]) == 1
    assert {Path(f["path"]).name for f in default["near_duplicates"][0]["files"]} == {src.name, "brighter.png"}
    assert not default["near_duplicates"][0]["cross_split"] and default["leakage"]["near"] == 0
    assert default["formats"] == {"JPEG": 6, "PNG": 1}
    found = [bool(check(root, progress=False, near_threshold=t)["near_duplicates"]) for t in range(-1, 5)]
    assert found[0] is False and found[-1] is True
    assert found == sorted(found)  # once found at some threshold, found at every larger one


def test_csv_group_leakage_and_missing_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
        # patient0 sits in train and val; the others stay on one side
        group = "patient0" if i in (0, 4) else f"patient{i}"
        rows.append([name, "ab"[i % 2], group, "train" if i < 4 else "val"])
    rows.append(["lost.png", "a", "patient9", "train"])
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "group", "split"], *rows])
    r = check(tmp_path / "labels.csv", progress=False)
    assert r["layout"] == "csv" and r["usable"] == 8 and r["files"] == 9
    assert r["leakage"]["groups"] == [{"group": "patient0", "splits": ["train", "val"]}]
    assert "1 group(s) appear in more than one split" in advice_with(r, "split by group")
    (lost,) = r["quarantined"]
    assert Path(lost["path"]).name == "lost.png" and lost["split"] == "csv" and "does not exist" in lost["reason"]
    assert r["modes"] == {"RGB": 8} and r["formats"] == {"PNG": 8} and r["sizes"]["smaller_than_64px"] == 8


def test_missing_folder_is_a_fovea_error(tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="does not exist"):
        check(tmp_path / "nowhere", progress=False)


def test_print_report_shows_the_problems(report: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping of long lines
    print_report(report)
    out = capsys.readouterr().out
    assert "20 files, 17 usable, 2 classes" in out
    assert "3 unusable file(s)" in out and "truncated" in out
    assert "1 exact duplicates group(s) (1 across splits)" in out
    assert "1 near duplicates group(s) (1 across splits)" in out
    assert "LEAK" in out and "What to do" in out and "imbalanced" in out


# -------------------------------------------------------------------------------------------------- CLI


def test_cli_json(messy: Path) -> None:
    result = CliRunner().invoke(app, ["check", str(messy), "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)  # the whole of stdout is one JSON object
    for key in ("layout", "classes", "files", "usable", "counts", "usable_counts", "imbalance", "sizes", "modes",
                "formats", "quarantined", "exact_duplicates", "near_duplicates", "leakage", "advice"):
        assert key in r, f"--json output lacks {key!r}"
    assert r["usable_counts"] == {"train": {"cat": 9, "dog": 3}, "val": {"cat": 3, "dog": 2}}
    assert len(r["quarantined"]) == 3 and all(q["reason"] for q in r["quarantined"])
    assert r["leakage"]["exact"] == 1 and r["leakage"]["near"] == 1
    assert any("imbalanced" in tip for tip in r["advice"])


def test_cli_table(messy: Path) -> None:
    result = CliRunner().invoke(app, ["check", str(messy)])
    assert result.exit_code == 0, result.output
    assert "17 usable" in result.stdout and "What to do" in result.stdout


def test_cli_missing_folder_says_error_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fovea.cli", "check", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not exist" in errors[0] and "nowhere" in errors[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_a_class_with_no_usable_image_is_named_not_called_imbalance(tmp_path: Path) -> None:
    (tmp_path / "d" / "cat").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "d" / "cat" / f"{i}.png")
    (tmp_path / "d" / "dog").mkdir()
    (tmp_path / "d" / "dog" / "notes.jpg").write_text("not a photo")
    r = check(tmp_path / "d", val_fraction=0.3, progress=False)
    assert any("train: class(es) with no usable image (dog)" in tip for tip in r["advice"])
    assert all("imbalanced" not in tip for tip in r["advice"])


# ------------------------------------------------------------------------------- near duplicates at scale


def all_pairs(hashes: np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """The reference: every pair's Hamming distance, by brute force."""
    dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(dist <= threshold, k=1))
    return list(zip(i.tolist(), j.tolist(), dist[i, j].tolist()))


def planted(n: int, seed: int, *, skew: bool = False, flips: int = 10) -> np.ndarray:
    """Random 64-bit hashes, a tenth of them copies of others with 0 to ``flips`` bits flipped; ``skew``: only
    24 bits ever set, so chunks share values and buckets are large (as in hashes of similar images)."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    if skew:
        h &= np.uint64(0x00FF_0000_FF00_00FF)
    k = n // 10
    src, dst = rng.integers(0, n, k), rng.integers(0, n, k)
    masks = np.zeros(k, np.uint64)
    for f, bit in enumerate(rng.integers(0, 64, (flips, k)).astype(np.uint64)):
        masks ^= np.where(rng.integers(0, flips + 1, k) > f, np.uint64(1) << bit, np.uint64(0))
    h[dst] = h[src] ^ masks
    return h


@pytest.mark.parametrize("skew", [False, True], ids=["uniform", "skewed"])
@pytest.mark.parametrize("threshold", [-1, 0, 1, 2, 4, 8, 13, 20, 63, 64])
def test_near_pairs_equal_brute_force(threshold: int, skew: bool) -> None:
    from fovea.data._check import _near_pairs

    h = planted(1500, seed=threshold + 1, skew=skew)
    pairs = _near_pairs(h, threshold)
    assert pairs.shape[1] == 3 and pairs.dtype == np.int64
    assert [tuple(p) for p in pairs.tolist()] == all_pairs(h, threshold)  # same pairs, distances and order


def test_near_pairs_edge_cases() -> None:
    from fovea.data._check import _near_pairs

    assert _near_pairs(np.zeros(0, np.uint64), 4).shape == (0, 3)
    assert _near_pairs(np.array([7], np.uint64), 4).shape == (0, 3)
    same = np.full(5, 2**64 - 1, np.uint64)  # one bucket in every chunk
    assert [tuple(p) for p in _near_pairs(same, 0).tolist()] == all_pairs(same, 0)
    assert len(_near_pairs(same, 0)) == 10


def test_near_pairs_at_scale_finds_the_planted_pairs() -> None:
    """200 000 hashes (no time asserted: comparing every pair would be 2e10 comparisons): each of 2000 planted
    copies with 0 to 4 bits flipped is found, at its distance, and nothing else (random 64-bit hashes lie within
    4 bits of each other with probability 4e-14 per pair)."""
    from fovea.data._check import _near_pairs

    rng = np.random.default_rng(0)
    n, k = 200_000, 2000
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    want = set()
    for c in range(k):
        i, j = c, n - 1 - c  # disjoint
        bits = rng.choice(64, size=c % 5, replace=False)
        h[j] = h[i] ^ np.uint64(sum(1 << int(b) for b in bits))
        want.add((i, j, c % 5))
    assert {tuple(p) for p in _near_pairs(h, 4).tolist()} == want


def test_groups_are_connected_components() -> None:
    from fovea.data._check import _groups

    pairs = np.array([[5, 7, 1], [0, 1, 0], [1, 2, 3], [2, 0, 4]])
    assert _groups(pairs, 9) == [[0, 1, 2], [5, 7]]
    assert _groups(np.zeros((0, 3), np.int64), 9) == []


# The check forks only from a process with one thread (forking a threaded process can deadlock), and a test run
# has threads left by other tests: these two run the check in a fresh interpreter, as the CLI does.
_IN_A_FRESH_PROCESS = """
import concurrent.futures, json, os, sys
import fovea.data._check as m
from fovea.errors import FoveaError
os.cpu_count = lambda: 2  # two workers even on a one-core machine
m._PROCESSES_FROM, m._CHUNK = 0, 3  # processes for any size; several tasks, results kept in order
made = []
class Spy(concurrent.futures.ProcessPoolExecutor):
    def __init__(self, *a, **k):
        made.append(k["mp_context"].get_start_method())
        super().__init__(*a, **k)
m.ProcessPoolExecutor = Spy
if sys.argv[2] == "die":
    def die(paths, max_pixels):
        os._exit(3)  # as a file that crashes the image library would
    m._inspect_many = die
try:
    print(json.dumps({"report": m.check(sys.argv[1], progress=False), "made": made}))
except FoveaError as e:
    print(json.dumps({"error": str(e), "made": made}))
"""


def _check_in_a_fresh_process(data: Path, mode: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", _IN_A_FRESH_PROCESS, str(data), mode], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_inspection_in_processes_gives_the_same_report(messy: Path, report: dict[str, Any]) -> None:
    """Large data sets are inspected in forked processes (small ones in threads): the same report either way."""
    out = _check_in_a_fresh_process(messy, "same")
    assert out["made"] == ["fork"]
    assert out["report"] == json.loads(json.dumps(report))


def test_a_dying_checking_process_is_a_fovea_error(messy: Path) -> None:
    out = _check_in_a_fresh_process(messy, "die")
    assert out["made"] == ["fork"] and "checking process died" in out["error"]
