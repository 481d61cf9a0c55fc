"""Finding images, labels and splits in what a user points at: split folders, class folders, a CSV."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fovea.data import Dataset, discover, eval_samples
from fovea.errors import FoveaError


def write_image(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), shade % 256, np.uint8)).save(path)
    return path


def class_tree(root: Path, counts: dict[str, int]) -> Path:
    """root/CLASS/CLASS_i.png for each class."""
    for cls, n in counts.items():
        for i in range(n):
            write_image(root / cls / f"{cls}_{i:03d}.png", i)
    return root


def names(ds: Dataset, split: str) -> set[str]:
    return {Path(s.path).name for s in ds.splits[split]}


def labels(ds: Dataset, split: str) -> Counter[str]:
    return Counter(ds.classes[s.label] for s in ds.splits[split])


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------ split folders


def test_split_layout_keeps_the_users_splits(tmp_path: Path) -> None:
    class_tree(tmp_path / "train", {"cat": 5, "dog": 3})
    class_tree(tmp_path / "val", {"cat": 2, "dog": 1})
    class_tree(tmp_path / "test", {"cat": 1, "dog": 2})
    ds = discover(tmp_path)
    assert ds.layout == "splits"
    assert ds.classes == ["cat", "dog"]
    assert set(ds.splits) == {"train", "val", "test"}
    assert ds.counts() == {"train": {"cat": 5, "dog": 3}, "val": {"cat": 2, "dog": 1}, "test": {"cat": 1, "dog": 2}}
    for split in ds.splits:
        for s in ds.splits[split]:
            assert Path(s.path).is_file()
            assert Path(s.path).parent.parent.name == split
            assert Path(s.path).parent.name == ds.classes[s.label]


@pytest.mark.parametrize("val_name", ["valid", "validation", "Val"])
def test_val_folder_aliases(tmp_path: Path, val_name: str) -> None:
    class_tree(tmp_path / "train", {"a": 2, "b": 2})
    class_tree(tmp_path / val_name, {"a": 1, "b": 1})
    ds = discover(tmp_path)
    assert set(ds.splits) == {"train", "val"}
    assert ds.counts()["val"] == {"a": 1, "b": 1}
    assert ds.counts()["train"] == {"a": 2, "b": 2}


def test_split_layout_without_val_is_split_from_train(tmp_path: Path) -> None:
    class_tree(tmp_path / "train", {"a": 10, "b": 10})
    ds = discover(tmp_path, val_fraction=0.3)
    assert ds.counts() == {"train": {"a": 7, "b": 7}, "val": {"a": 3, "b": 3}}
    assert not names(ds, "train") & names(ds, "val")


def test_val_class_unknown_to_train_is_an_error(tmp_path: Path) -> None:
    class_tree(tmp_path / "train", {"a": 2, "b": 2})
    class_tree(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(FoveaError, match="zebra"):
        discover(tmp_path)


def test_hidden_files_and_folders_are_ignored(tmp_path: Path) -> None:
    class_tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "a" / "Thumbs.db").write_bytes(b"junk")
    write_image(tmp_path / ".hidden" / "x.png")
    write_image(tmp_path / "_trash" / "x.png")
    ds = discover(tmp_path, val_fraction=0.5)
    assert ds.classes == ["a", "b"]
    assert sum(len(v) for v in ds.splits.values()) == 4


def test_non_image_with_an_image_name_is_kept_for_quarantine(tmp_path: Path) -> None:
    """A broken file must reach the decoder (and its quarantine list), not be silently skipped."""
    class_tree(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "broken.jpg").write_text("not an image")
    ds = discover(tmp_path, val_fraction=0.2)
    assert "broken.jpg" in names(ds, "train") | names(ds, "val")


def test_images_in_subfolders_of_a_class_belong_to_it(tmp_path: Path) -> None:
    class_tree(tmp_path, {"a": 2, "b": 2})
    write_image(tmp_path / "a" / "2023" / "deep.png")
    ds = discover(tmp_path, val_fraction=0.25)
    every = ds.splits["train"] + ds.splits["val"]
    deep = [s for s in every if Path(s.path).name == "deep.png"]
    assert len(deep) == 1 and ds.classes[deep[0].label] == "a"


# ----------------------------------------------------------------------------------------- class folders


def test_class_folders_are_split_stratified(tmp_path: Path) -> None:
    class_tree(tmp_path, {"cat": 50, "dog": 20, "eel": 10})
    ds = discover(tmp_path, val_fraction=0.2, seed=0)
    assert ds.layout == "folders"
    assert ds.classes == ["cat", "dog", "eel"]
    assert ds.counts() == {"train": {"cat": 40, "dog": 16, "eel": 8}, "val": {"cat": 10, "dog": 4, "eel": 2}}
    assert not names(ds, "train") & names(ds, "val")
    assert len(names(ds, "train") | names(ds, "val")) == 80


def test_every_class_keeps_a_training_image(tmp_path: Path) -> None:
    class_tree(tmp_path, {"a": 1, "b": 2, "c": 30})
    ds = discover(tmp_path, val_fraction=0.5)
    assert all(n >= 1 for n in ds.counts()["train"].values())
    assert ds.counts()["train"]["a"] == 1 and ds.counts()["val"]["a"] == 0


def test_split_is_repeatable_for_a_seed_and_changes_with_it(tmp_path: Path) -> None:
    class_tree(tmp_path, {"a": 30, "b": 30})
    first = discover(tmp_path, seed=1)
    again = discover(tmp_path, seed=1)
    other = discover(tmp_path, seed=2)
    assert first.splits == again.splits
    assert names(first, "val") != names(other, "val")
    assert labels(first, "val") == labels(other, "val")  # still stratified
    assert first.fingerprint() == again.fingerprint()


def test_split_does_not_depend_on_listing_order(tmp_path: Path) -> None:
    class_tree(tmp_path / "one", {"a": 12, "b": 12})
    class_tree(tmp_path / "two", {"b": 12, "a": 12})  # created in another order
    first, second = discover(tmp_path / "one", seed=3), discover(tmp_path / "two", seed=3)
    assert names(first, "val") == names(second, "val")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_out_of_range(tmp_path: Path, fraction: float) -> None:
    class_tree(tmp_path / "flat", {"a": 3, "b": 3})
    with pytest.raises(FoveaError, match="val-fraction"):
        discover(tmp_path / "flat", val_fraction=fraction)
    class_tree(tmp_path / "split" / "train", {"a": 3, "b": 3})
    class_tree(tmp_path / "split" / "val", {"a": 1, "b": 1})
    with pytest.raises(FoveaError, match="val-fraction"):  # unused here, but a typo all the same
        discover(tmp_path / "split", val_fraction=fraction)


# -------------------------------------------------------------------------------------------------- CSV


def test_csv_paths_are_relative_to_the_csv(tmp_path: Path) -> None:
    rows = [[f"img/{c}{i}.png", c] for c in ("x", "y") for i in range(5)]
    for p, _ in rows:
        write_image(tmp_path / p)
    ds = discover(write_csv(tmp_path / "labels.csv", ["path", "label"], rows), val_fraction=0.4)
    assert ds.layout == "csv"
    assert ds.classes == ["x", "y"]
    assert ds.counts() == {"train": {"x": 3, "y": 3}, "val": {"x": 2, "y": 2}}
    assert ds.missing == []
    for s in ds.splits["train"] + ds.splits["val"]:
        assert Path(s.path).is_file() and Path(s.path).name[0] == ds.classes[s.label]


def test_csv_header_is_case_and_space_insensitive(tmp_path: Path) -> None:
    rows = [[f"{c}{i}.png", c] for c in ("x", "y") for i in range(3)]
    for p, _ in rows:
        write_image(tmp_path / p)
    ds = discover(write_csv(tmp_path / "l.csv", [" Path", "LABEL "], rows), val_fraction=0.34)
    assert sum(len(v) for v in ds.splits.values()) == 6


def test_csv_missing_files_are_listed_not_fatal(tmp_path: Path) -> None:
    rows = [[f"{c}{i}.png", c] for c in ("x", "y") for i in range(3)]
    for p, _ in rows:
        write_image(tmp_path / p)
    rows += [["gone.png", "x"], ["unlabelled.png", ""]]
    write_image(tmp_path / "unlabelled.png")
    ds = discover(write_csv(tmp_path / "l.csv", ["path", "label"], rows), val_fraction=0.34)
    assert sum(len(v) for v in ds.splits.values()) == 6
    missing = {Path(p).name: why for p, why in ds.missing}
    assert set(missing) == {"gone.png", "unlabelled.png"}
    assert "does not exist" in missing["gone.png"]
    assert "no label" in missing["unlabelled.png"]


def test_csv_groups_never_straddle_splits(tmp_path: Path) -> None:
    rows = []
    for g in range(10):
        for i in range(4):
            p = f"p{g}_{i}.png"
            write_image(tmp_path / p, g * 10 + i)
            rows.append([p, "sick" if (g + i) % 2 else "well", f"patient{g}"])
    for seed in range(5):
        ds = discover(write_csv(tmp_path / "l.csv", ["path", "label", "group"], rows), val_fraction=0.3, seed=seed)
        train_groups = {s.group for s in ds.splits["train"]}
        val_groups = {s.group for s in ds.splits["val"]}
        assert train_groups and val_groups
        assert not train_groups & val_groups, f"seed {seed}: a patient is in both splits"
        assert len(train_groups | val_groups) == 10
        assert 8 <= len(ds.splits["val"]) <= 16  # about 30% of 40, in whole groups of 4
        assert all(s.group is not None for s in ds.splits["train"] + ds.splits["val"])


def test_csv_split_column_is_respected(tmp_path: Path) -> None:
    rows = []
    for i in range(6):
        p = f"f{i}.png"
        write_image(tmp_path / p, i)
        rows.append([p, "ab"[i % 2], ["train", "train", "valid", "valid", "test", "test"][i]])
    ds = discover(write_csv(tmp_path / "l.csv", ["path", "label", "split"], rows))
    assert names(ds, "train") == {"f0.png", "f1.png"}
    assert names(ds, "val") == {"f2.png", "f3.png"}
    assert names(ds, "test") == {"f4.png", "f5.png"}


def test_csv_without_path_and_label_columns(tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="'path' and 'label'"):
        discover(write_csv(tmp_path / "l.csv", ["file", "class"], [["a.png", "x"]]))


def test_csv_without_rows(tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="no rows"):
        discover(write_csv(tmp_path / "l.csv", ["path", "label"], []))


def test_csv_with_one_label(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    with pytest.raises(FoveaError, match="only one class"):
        discover(write_csv(tmp_path / "l.csv", ["path", "label"], [["a.png", "x"], ["b.png", "x"]]))


# ------------------------------------------------------------------------------------------------ errors


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    class_tree(tmp_path, {"cat": 3, "dog": 3})
    (tmp_path / "hamster").mkdir()
    with pytest.raises(FoveaError, match="no files") as info:
        discover(tmp_path)
    assert "hamster" in str(info.value) and "cat" not in str(info.value).split(":")[-1]


def test_empty_class_folder_in_train_split_is_named(tmp_path: Path) -> None:
    class_tree(tmp_path / "train", {"cat": 3})
    (tmp_path / "train" / "dog").mkdir()
    class_tree(tmp_path / "val", {"cat": 1})
    with pytest.raises(FoveaError, match="dog"):
        discover(tmp_path)


def test_single_class(tmp_path: Path) -> None:
    class_tree(tmp_path, {"cat": 4})
    with pytest.raises(FoveaError, match="only one class") as info:
        discover(tmp_path)
    assert "cat" in str(info.value)


def test_folder_without_class_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "loose.png")
    with pytest.raises(FoveaError, match="no class folders"):
        discover(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="does not exist") as info:
        discover(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_a_file_that_is_not_a_csv(tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="is a file"):
        discover(write_image(tmp_path / "one.png"))


def test_csv_with_one_group_is_an_error_not_an_empty_train_split(tmp_path: Path) -> None:
    rows = [[write_image(tmp_path / f"{c}{i}.png", i).name, c, "site1"] for c in "ab" for i in range(3)]
    with pytest.raises(FoveaError, match="one group"):
        discover(write_csv(tmp_path / "d.csv", ["path", "label", "group"], rows))


@pytest.mark.parametrize("seed", range(6))
def test_group_split_never_takes_a_class_out_of_train(tmp_path: Path, seed: int) -> None:
    # "big" holds 5 rows of both classes, "small" 1 row of class a: only "small" may go to val.
    rows = [[write_image(tmp_path / f"big{i}.png", i).name, "ab"[i % 2], "big"] for i in range(5)]
    rows.append([write_image(tmp_path / "small.png", 9).name, "a", "small"])
    ds = discover(write_csv(tmp_path / "d.csv", ["path", "label", "group"], rows), val_fraction=0.2, seed=seed)
    assert set(labels(ds, "train")) == {"a", "b"}
    assert {s.group for s in ds.splits["val"]} <= {"small"}


def test_csv_saved_by_excel_with_a_bom(tmp_path: Path) -> None:
    for c in "ab":
        for i in range(3):
            write_image(tmp_path / f"{c}{i}.png", i)
    text = "path,label\n" + "".join(f"{c}{i}.png,{c}\n" for c in "ab" for i in range(3))
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    ds = discover(tmp_path / "d.csv", val_fraction=0.34)
    assert ds.classes == ["a", "b"] and sum(len(v) for v in ds.splits.values()) == 6


def _split_rows(tmp_path: Path, splits: list[str]) -> Path:
    rows = []
    for i, split in enumerate(splits):
        write_image(tmp_path / f"f{i}.png", i)
        rows.append([f"f{i}.png", "ab"[i % 2], split])
    return write_csv(tmp_path / "l.csv", ["path", "label", "split"], rows)


def test_csv_split_column_without_val_holds_val_out_of_train(tmp_path: Path) -> None:
    ds = discover(_split_rows(tmp_path, ["train"] * 10), val_fraction=0.2)
    assert len(ds.splits["train"]) == 8 and len(ds.splits["val"]) == 2


@pytest.mark.parametrize("splits,message", [(["val"] * 4, "no row has split 'train'"),
                                            (["train", "train", "bogus", "val"], "split 'bogus'")])
def test_csv_split_column_that_cannot_make_a_train_split(tmp_path: Path, splits: list[str], message: str) -> None:
    with pytest.raises(FoveaError, match=message):
        discover(_split_rows(tmp_path, splits))


def test_csv_that_is_not_utf8_and_an_image_given_as_data(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("path,label\na.png,x\n", encoding="utf-16")
    with pytest.raises(FoveaError, match="not UTF-8"):
        discover(tmp_path / "l.csv")
    with pytest.raises(FoveaError, match="not a .csv"):
        eval_samples(write_image(tmp_path / "cat.png"), ["a", "b"])


def test_a_val_fraction_that_leaves_no_validation_image(tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="leaves no validation image"):
        discover(class_tree(tmp_path, {"a": 5, "b": 5}), val_fraction=0.01)


def test_a_broken_link_is_kept_for_quarantine_and_a_stray_folder_is_named(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    root = class_tree(tmp_path / "d", {"a": 3, "b": 3})
    (root / "b" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    ds = discover(root, val_fraction=0.3)
    assert "gone.png" in names(ds, "train") | names(ds, "val")
    from fovea.data._check import check

    quarantined = check(root, val_fraction=0.3, progress=False)["quarantined"]
    assert [(Path(q["path"]).name, q["reason"]) for q in quarantined] == [("gone.png", "broken link: its target is missing")]
    split = tmp_path / "s"
    class_tree(split / "train", {"a": 5, "b": 5})
    class_tree(split, {"c": 2})  # a class folder left beside train/
    with caplog.at_level("WARNING"):
        discover(split)
    assert "beside train/val/test ignored: c" in caplog.text
