"""Shared fixtures: an isolated FOVEA_HOME per test, and small subsets of the real photos in ../shared/data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The real photos beside the checkout; FOVEA_TEST_DATA points elsewhere (e.g. a copy on a GPU machine).
SHARED = Path(os.environ.get("FOVEA_TEST_DATA", REPO.parent / "shared" / "data"))


def _first(folder: Path, n: int) -> list[Path]:
    return sorted(folder.glob("*.jpg"))[:n]


@pytest.fixture(autouse=True)
def fovea_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("fovea_home")
    monkeypatch.setenv("FOVEA_HOME", str(home))
    torch.set_num_threads(2)
    return home


@pytest.fixture(scope="session")
def pets_root() -> Path:
    root = SHARED / "pets"
    if not (root / "train").is_dir():
        pytest.fail(f"the real test data is missing: {root} (see ../shared/data/README.md)")
    return root


def make_subset(dst: Path, n_train: int, n_val: int, root: Path) -> Path:
    """Copy the first n images per class of pets/train and pets/val into dst (split layout)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in ("cat", "dog"):
            out = dst / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for p in _first(root / split / cls, n):
                shutil.copy(p, out / p.name)
    return dst


@pytest.fixture(scope="session")
def tiny_pets(tmp_path_factory: pytest.TempPathFactory, pets_root: Path) -> Path:
    """40 train + 20 val images per class of real cats and dogs (read-only: copy before changing)."""
    return make_subset(tmp_path_factory.mktemp("tiny_pets"), 40, 20, pets_root)


def train_cnn(data: Path, factory: pytest.TempPathFactory, tag: str, *, image_size: int, epochs: int,
              widths: tuple[int, ...]) -> Path:
    """A small cnn trained in its own FOVEA_HOME, for module-scoped fixtures (the per-test one does not exist yet)."""
    import fovea

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FOVEA_HOME", str(factory.mktemp(f"{tag}_home")))
        return fovea.train(data, model="cnn", image_size=image_size, epochs=epochs, extra={"widths": widths},
                           out=str(factory.mktemp(f"{tag}_run") / "cnn"), progress=False)


def with_threshold(run: Path, folder: Path, threshold: float) -> Path:
    """A copy of the model whose unknown-image threshold is moved: -1e30 makes every image unknown, 1e30 none."""
    from fovea.artifact import read_meta, write_meta

    shutil.copytree(run, folder)
    meta = read_meta(folder)
    meta["unknown"]["threshold"] = threshold
    write_meta(folder, meta)
    return folder


def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The CLI's entry point in this process: (exit code, stdout, stderr)."""
    import sys

    from fovea.cli import main

    monkeypatch.setattr(sys, "argv", ["fovea", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def missing_system_package(what: str) -> None:
    """A test needs a system package that is not installed: skipped with the reason, or failed under
    FOVEA_REQUIRE_SYSTEM=1 (what .ci/run sets: CI must run every test). scripts/setup-dev installs them."""
    message = f"{what} is not installed (scripts/setup-dev installs it as root or with sudo)"
    if os.environ.get("FOVEA_REQUIRE_SYSTEM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _postgres_bin(tool: str) -> str | None:
    import glob

    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))  # Debian's layout: one folder per version
    return versions[-1] if versions else shutil.which(tool)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a generator fixture
    """A real PostgreSQL server for the session: $FOVEA_TEST_POSTGRES, or a throwaway cluster started here.

    The cluster listens on a Unix socket in a temporary folder only (no TCP port to collide with), trusts
    local connections, and is stopped at the end. As root, the server runs as the ``postgres`` user (it
    refuses to run as root). Without the PostgreSQL server binaries (Debian's ``postgresql`` package, which
    scripts/setup-dev installs) the tests that need it are skipped with the reason.
    """
    import subprocess

    url = os.environ.get("FOVEA_TEST_POSTGRES")
    if url:
        yield url
        return
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        missing_system_package("PostgreSQL (Debian's postgresql package; or set FOVEA_TEST_POSTGRES to a server)")
    root = tmp_path_factory.mktemp("postgres")
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        root.chmod(0o755)
        for parent in root.parents:  # the postgres user must be able to reach the socket folder
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)

    def run(*cmd: str) -> None:
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr or done.stdout}\n{log[-2000:]}")

    run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    run(pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o", f"-k {sock} -c listen_addresses='' -p 54329",
        "start")
    try:
        run(str(Path(initdb).parent / "createdb"), "-h", str(sock), "-p", "54329", "-U", "postgres", "fovea")
        yield f"postgresql://postgres@/fovea?host={sock}&port=54329"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=120)
