"""The ``fovea`` command as a user runs it: a separate process, its exit code, stdout and stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fovea.cli import app

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands if c.callback is not None)


def fovea_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fovea.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env if env is not None else os.environ.copy())


@pytest.fixture(scope="module")
def trained(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    env = {**os.environ, "FOVEA_HOME": str(tmp_path_factory.mktemp("cli_home"))}
    run = tmp_path_factory.mktemp("cli_run") / "run"
    done = fovea_cli("train", str(tiny_pets), "--model", "cnn", "--image-size", "32", "--epochs", "2",
                     "--out", str(run), "-q", env=env)
    return run, done


def test_every_command_is_listed() -> None:
    assert {"check", "demo", "evaluate", "models", "predict", "train"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command: str) -> None:
    done = fovea_cli(command, "--help")
    assert done.returncode == 0, done.stderr
    assert "Examples" in done.stdout
    assert f"fovea {command}" in done.stdout


def test_train_writes_a_run_folder(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run, done = trained
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run folder" in done.stdout
    assert str(run) in done.stdout
    assert "val accuracy" in done.stdout
    for name in ("model.safetensors", "model.json", "metrics.json", "history.csv", "report.html"):
        assert (run / name).is_file()


def test_evaluate_json(trained: tuple[Path, subprocess.CompletedProcess[str]], tiny_pets: Path) -> None:
    run, _ = trained
    done = fovea_cli("evaluate", str(run), str(tiny_pets), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout)  # the whole of stdout is one JSON object
    assert isinstance(m, dict)
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "confusion_matrix", "classes", "n_images",
                "skipped"):
        assert key in m, f"--json output lacks {key!r}"
    assert m["n_images"] == 40 and m["skipped"] == 0 and m["classes"] == ["cat", "dog"]
    assert sum(map(sum, m["confusion_matrix"])) == 40


def test_evaluate_table(trained: tuple[Path, subprocess.CompletedProcess[str]], tiny_pets: Path) -> None:
    run, _ = trained
    done = fovea_cli("evaluate", str(run), str(tiny_pets))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "40" in done.stdout and "accuracy" in done.stdout and "cat" in done.stdout


def test_predict_json_lines(trained: tuple[Path, subprocess.CompletedProcess[str]], tiny_pets: Path) -> None:
    run, _ = trained
    files = [str(sorted((tiny_pets / "val" / c).glob("*.jpg"))[0]) for c in ("cat", "dog")]
    done = fovea_cli("predict", str(run), *files, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [d["path"] for d in lines] == files
    for d in lines:
        assert {"path", "label", "probability", "probabilities"} <= set(d)
        assert d["label"] in ("cat", "dog", "unknown")  # "unknown": none of the classes (over its threshold)
        assert set(d["probabilities"]) == {"cat", "dog"}
        assert sum(d["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert d["probability"] == pytest.approx(max(d["probabilities"].values()))


def test_predict_reports_a_fake_jpeg_as_skipped(trained: tuple[Path, subprocess.CompletedProcess[str]],
                                                tiny_pets: Path, tmp_path: Path) -> None:
    run, _ = trained
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is a text file\n")
    real = str(sorted((tiny_pets / "val" / "cat").glob("*.jpg"))[0])

    done = fovea_cli("predict", str(run), real, str(fake), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [d["path"] for d in lines if "label" in d] == [real]
    errors = [d for d in lines if "error" in d]
    assert [d["path"] for d in errors] == [str(fake)] and errors[0]["error"]

    done = fovea_cli("predict", str(run), str(fake))
    assert "Traceback" not in done.stderr
    assert "holiday.jpg" in done.stderr and "skipped" in done.stderr
    assert done.returncode == 1  # nothing could be predicted


def test_train_on_a_missing_folder(tmp_path: Path) -> None:
    done = fovea_cli("train", str(tmp_path / "no-such-data"), "--image-size", "32", "--epochs", "1", "-q",
                     "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "error:" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "run").exists()


def test_check_and_ops_start_without_torch(tiny_pets: Path, tmp_path: Path) -> None:
    """Importing torch costs seconds; the commands that only read images must not pay for it."""
    image = next(tiny_pets.rglob("*.jpg"))
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom fovea.cli import app\n"
            f"for args in (['check', {str(tiny_pets)!r}, '--json'], ['ops', 'gray,clahe', {str(image)!r}, '--out', "
            f"{str(tmp_path / 'g.png')!r}]):\n"
            "    r = CliRunner().invoke(app, args)\n    assert r.exit_code == 0, r.output\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert (tmp_path / "g.png").is_file()


def test_demo_without_pets_trains_on_the_digits_and_evaluates_only_unseen_images(
        tmp_path: Path, fovea_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fovea.cli._demo as demo

    monkeypatch.setattr(demo, "find_pets", lambda: None)  # a machine without ../shared/data
    monkeypatch.delenv("FOVEA_DEMO_DATA", raising=False)
    run = demo.run_demo(out=tmp_path / "demo", epochs=2)
    digits = fovea_home / "demo-data" / "digits"
    assert len(list((digits / "train").rglob("*.png"))) == 1437 and len(list((digits / "val").rglob("*.png"))) == 360
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_val"]) == (1437, 360)
    assert len(metrics["classes"]) == 10
    assert (run / "report.html").is_file() and (run / "evaluation.html").is_file()
