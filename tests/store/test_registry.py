"""The store (SQLite and a real PostgreSQL, migrated by Alembic) and the registry on top of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_main, train_cnn

from fovea import model_registry
from fovea.errors import FoveaError
from fovea.store import Base, ModelVersion, Store


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "registry", image_size=16, epochs=1,
                     widths=(8, 8, 8, 8))


def schema_differences(store: Store) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def alembic_revision(store: Store) -> str | None:
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_a_new_sqlite_store_is_migrated_to_the_schema_of_the_code(fovea_home: Path) -> None:
    store = Store()
    assert store.url == f"sqlite:///{fovea_home / 'fovea.db'}" and (fovea_home / "fovea.db").exists()
    assert alembic_revision(store) == "0006"
    assert schema_differences(store) == []  # the migration creates exactly what the models describe
    Store()  # opening again is a no-op, not an error


def test_postgresql_store_is_migrated_and_holds_the_registry(postgres_url: str, run: Path) -> None:
    store = Store(postgres_url)
    assert store.engine.dialect.name == "postgresql"
    assert alembic_revision(store) == "0006" and schema_differences(store) == []
    v = model_registry.add(run, "pg-pets", alias="production", store=store)
    again = model_registry.add(run, "pg-pets", store=store)
    assert (v.version, again.version) == (1, 2)
    assert model_registry.resolve("pg-pets", store=Store(postgres_url)).version == 1  # production wins over newest


def test_add_makes_versions_copies_files_and_moves_aliases(run: Path, fovea_home: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    v1 = model_registry.add(copy, "pets")
    v2 = model_registry.add(copy, "pets", alias="candidate")
    assert (v1.version, v2.version) == (1, 2) and v2.aliases == ["candidate"]
    assert Path(v1.path) == fovea_home / "models" / "pets" / "1"
    assert sorted(p.name for p in Path(v1.path).iterdir()) == ["model.json", "model.safetensors", "reference.npz", "report.html",
                                                               "unknown.safetensors"]  # no checkpoints
    assert model_registry.resolve("pets").version == 1  # the first version became production; adding more does not move it
    assert model_registry.versions("pets")[0].aliases == ["production"] and model_registry.resolve("pets:candidate").version == 2
    model_registry.set_alias("pets", 2, "production")  # an alias moves, it is not duplicated
    assert model_registry.resolve("pets:production").version == 2
    assert [x.aliases for x in model_registry.versions("pets")] == [[], ["candidate", "production"]]
    shutil.rmtree(copy)  # the registered copy does not need the run
    preds, _ = model_registry.open_version(model_registry.resolve("pets:1"), "cpu").predict(sorted(run.parent.glob("*"))[:0])
    assert preds == []
    (Path(v1.path) / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(FoveaError, match="changed since they were registered"):
        model_registry.open_version(model_registry.resolve("pets:1"), "cpu")


def test_registry_errors(run: Path, tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="not allowed"):
        model_registry.add(run, "../escape")
    with pytest.raises(FoveaError, match="not a Fovea model"):
        model_registry.add(tmp_path, "pets")
    model_registry.add(run, "pets")
    with pytest.raises(FoveaError, match="not in the registry"):
        model_registry.resolve("pets:7")
    with pytest.raises(FoveaError, match="no model named"):
        model_registry.versions("dogs")
    with Store().session() as s:
        assert s.query(ModelVersion).count() == 1  # the refused adds left nothing behind




def test_cli(run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["registry", "add", str(run), "--name", "pets", "--alias", "production"], monkeypatch, capsys)
    assert code == 0 and "registered pets:1 (production)" in out
    code, out, _ = run_main(["registry", "list", "--json"], monkeypatch, capsys)
    assert code == 0 and [v["version"] for v in json.loads(out)] == [1]
    code, out, _ = run_main(["registry", "show", "pets:production", "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["classes"] == ["cat", "dog"]
    code, _, err = run_main(["registry", "alias", "pets", "production"], monkeypatch, capsys)
    assert code == 2 and "NAME:VERSION" in err
    code, _, err = run_main(["registry", "show", "pets:9"], monkeypatch, capsys)
    assert code == 2 and "not in the registry" in err and "Traceback" not in err


def test_a_database_at_the_first_schema_upgrades_with_its_rows(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from fovea.store._store import MIGRATIONS

    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with create_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("INSERT INTO model_versions (id, name, version, path, source, digest, runtime, classes, "
                          "image_size, created) VALUES (1, 'm', 1, 'p', 's', 'd', 'torch', '[]', 32, '2026-01-01')"))
        conn.execute(text("INSERT INTO deployments (id, name, strategy, state, production_id, percent, steps, step, "
                          "interval_s, thresholds, created, updated) VALUES (1, 'm', 'shadow', 'stopped', 1, 0, '[]', "
                          "0, 60, '{}', '2026-01-01', '2026-01-01')"))
    store = Store(url)
    assert alembic_revision(store) == "0006" and schema_differences(store) == []
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT step_started IS NOT NULL FROM deployments")).scalar() == 1
