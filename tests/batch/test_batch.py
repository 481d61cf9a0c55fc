"""fovea batch into SQLite and a real PostgreSQL: one row per image, resumable after kill -9, idempotent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_main, train_cnn
from sqlalchemy import func, select

import fovea
from fovea.batch import run_batch
from fovea.errors import FoveaError
from fovea.store import PredictionRecord, Store


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "batch", image_size=16, epochs=1,
                     widths=(8, 8, 8, 8))


@pytest.fixture(scope="module")
def photos(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """360 inputs: the 120 tiny_pets photos under three folders (links), plus nothing else."""
    root = tmp_path_factory.mktemp("batch_photos")
    for copy in ("a", "b", "c"):
        for p in sorted(tiny_pets.rglob("*.jpg")):
            dst = root / copy / p.relative_to(tiny_pets)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(p)
    return root


def stored(url: str, job: str) -> tuple[int, int]:
    """(rows, distinct input keys) of ``job``."""
    with Store(url).session() as s:
        rows = s.scalar(select(func.count()).select_from(PredictionRecord).where(PredictionRecord.job == job))
        keys = s.scalar(select(func.count(func.distinct(PredictionRecord.input_key))).where(PredictionRecord.job == job))
    return int(rows or 0), int(keys or 0)


def test_every_image_once_and_a_rerun_adds_nothing(run: Path, photos: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    r = run_batch(str(run), photos, db=url, batch_size=50, progress=False, output=tmp_path / "out.parquet")
    assert (r.inputs, r.predicted, r.already_done, r.unreadable) == (360, 360, 0, [])
    assert stored(url, r.job) == (360, 360)
    expected, _ = fovea.load(run, "cpu").predict(sorted((photos / "a").rglob("*.jpg"))[:5])
    with Store(url).session() as s:
        got = {p.input_key: p.label for p in s.scalars(select(PredictionRecord).where(PredictionRecord.job == r.job))}
    assert [got[Path(e.path).relative_to(photos).as_posix()] for e in expected] == [e.label for e in expected]
    again = run_batch(str(run), photos, db=url, progress=False)
    assert (again.job, again.predicted, again.already_done) == (r.job, 0, 360)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 360 and set(table.column("label").to_pylist()) <= {"cat", "dog", "unknown"}


def test_kill_9_then_resume_loses_and_duplicates_nothing(run: Path, photos: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    cmd = [sys.executable, "-m", "fovea.cli", "batch", str(run), str(photos), "--db", url, "--job", "k",
           "--batch-size", "1", "--workers", "1", "--device", "cpu", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    Store(url)  # create the schema now, so polling can start before the child does
    deadline = time.time() + 120
    while stored(url, "k")[0] < 20 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows_at_kill = stored(url, "k")[0]
    assert 20 <= rows_at_kill < 360, "the run must be killed in the middle"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert stored(url, "k") == (360, 360)


def test_postgresql(run: Path, photos: Path, postgres_url: str) -> None:
    r = run_batch(str(run), photos / "a", db=postgres_url, job="pg", batch_size=32, progress=False)
    assert r.predicted == 120 and stored(postgres_url, "pg") == (120, 120)
    assert run_batch(str(run), photos / "a", db=postgres_url, job="pg", progress=False).predicted == 0


def test_unreadable_files_and_csv_inputs(run: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((photos / "a").rglob("*.jpg"))[:3]
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(good[0].read_bytes()[:300])
    (folder / "empty.png").write_bytes(b"")
    url = f"sqlite:///{tmp_path / 'm.db'}"
    r = run_batch(str(run), folder, db=url, progress=False)
    assert r.predicted == 3 and sorted(k for k, _ in r.unreadable) == ["broken.jpg", "empty.png"]
    csv = tmp_path / "list.csv"
    csv.write_text("path\n" + "\n".join(f"mixed/{p.name}" for p in good) + "\nmixed/missing.jpg\n")
    r = run_batch(str(run), csv, db=url, progress=False)
    assert r.predicted == 3 and r.unreadable[0][0] == "mixed/missing.jpg" and "cannot read" in r.unreadable[0][1]
    csv.write_text("path,note\n" + "\n".join(f"mixed/{p.name}," for p in good + good[:1]) + "\n,no path\n")
    r = run_batch(str(run), csv, db=url, progress=False, job="dups")
    assert r.inputs == 3 and r.predicted == 3  # a repeated path is one input; a row without one is no input
    with pytest.raises(FoveaError, match="does not exist"):
        run_batch(str(run), tmp_path / "nowhere", db=url, progress=False)
    code, out, err = run_main(["batch", str(run), str(folder), "--db", url, "--job", "cli"], monkeypatch, capsys)
    assert code == 0 and "3 predicted" in out and "2 unreadable" in out and "broken.jpg" in err


def test_ray_engine_matches_the_local_engine_and_resumes(run: Path, photos: Path, tmp_path: Path) -> None:
    import ray

    folder = tmp_path / "ray_inputs"
    folder.mkdir()
    for p in sorted((photos / "a").rglob("*.jpg"))[:40]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    local = run_batch(str(run), folder, db=url, job="local", batch_size=16, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)  # a local instance
    try:
        distributed = run_batch(str(run), folder, db=url, job="ray", batch_size=16, progress=False, engine="ray")
        again = run_batch(str(run), folder, db=url, job="ray", batch_size=16, progress=False, engine="ray")
    finally:
        ray.shutdown()
    assert (distributed.predicted, again.predicted, again.already_done) == (40, 0, 40)
    assert distributed.unreadable == local.unreadable and distributed.unreadable[0][0] == "broken.jpg"
    assert stored(url, "ray") == (40, 40)
    with Store(url).session() as s:
        rows = {(r.job, r.input_key): r for r in s.scalars(select(PredictionRecord))}
    for (job, key), r in rows.items():
        if job == "ray":
            twin = rows[("local", key)]
            assert (r.label, r.fingerprint) == (twin.label, twin.fingerprint)
            assert abs(r.probabilities["cat"] - twin.probabilities["cat"]) < 1e-5
