"""The model registry: ``fovea registry add RUN --name pets`` -> pets version 1, 2, ...; aliases such as production.

A registered version is a copy of the artifact's own files (model.json and its weights: safetensors, ONNX or
torch.export; an ensemble's members) in ``$FOVEA_HOME/models/NAME/VERSION``, so deleting or retraining the run
folder never changes what is served. Its SHA-256 digest is recorded and checked when the copy is opened.
Versions, aliases and paths live in the store, so every server replica sees the same registry.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from fovea._home import home
from fovea.artifact import FILES, MEMBERS, META, is_model_folder, read_meta, runtime_of
from fovea.errors import FoveaError
from fovea.store import Alias, ModelVersion, Store

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass
class Version:
    """One registered model version, as the CLI and the server see it."""

    id: int
    name: str
    version: int
    path: str
    source: str
    digest: str
    runtime: str
    classes: list[str]
    image_size: int
    accuracy: float | None
    created: str
    aliases: list[str]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _check_name(kind: str, value: str) -> str:
    if not NAME.match(value) or value.isdigit():
        raise FoveaError(f"{kind} {value!r} is not allowed: letters, digits, '.', '_' and '-', up to 100, "
                         "starting with a letter or digit, and not only digits")
    return value


def _artifact_files(run: Path) -> list[Path]:
    """The files that make up the artifact (not checkpoints, reports or compressed siblings)."""
    files = [run / f for f in FILES if (run / f).is_file()]
    if (run / MEMBERS).is_dir():  # an ensemble's members
        files += sorted(p for p in (run / MEMBERS).rglob("*") if p.is_file() and p.name in FILES)
    return files


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in _artifact_files(folder):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _version(store: Store, row: ModelVersion) -> Version:
    with store.session() as s:
        aliases = s.scalars(select(Alias.alias).where(Alias.version_id == row.id).order_by(Alias.alias)).all()
    return Version(row.id, row.name, row.version, row.path, row.source, row.digest, row.runtime, list(row.classes),
                   row.image_size, row.accuracy, row.created.isoformat(timespec="seconds"), list(aliases))


def add(run: str | Path, name: str, *, alias: str | None = None, store: Store | None = None) -> Version:
    """Register the model in ``run`` as the next version of ``name``; copy its files into FOVEA_HOME.
    The first version of a name also becomes its ``production`` version."""
    from fovea.runtime import load

    store = store or Store()
    run = Path(run)
    _check_name("model name", name)
    if alias is not None:  # before anything is copied or registered
        _check_name("alias", alias)
    meta = read_meta(run)
    load(run, "cpu")  # refuse what would not load: wrong shapes, a pickle, a missing file
    files = _artifact_files(run)
    for attempt in range(5):  # two replicas adding at once: the unique constraint decides, the loser retries
        with store.session() as s:
            latest = s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name)) or 0
        version = latest + 1
        dest = home() / "models" / name / str(version)
        if dest.exists():  # left by a crash between copy and insert
            shutil.rmtree(dest)
        for f in files:
            (dest / f.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / f.relative_to(run))
        metrics = meta.get("metrics") or {}
        row = ModelVersion(name=name, version=version, path=str(dest), source=str(run.resolve()), digest=digest(dest),
                           runtime=runtime_of(meta), classes=list(meta["classes"]),
                           image_size=int(meta["preprocessing"]["image_size"]),
                           accuracy=metrics.get("accuracy") if isinstance(metrics, dict) else None)
        try:
            with store.session() as s:
                s.add(row)
        except IntegrityError:
            shutil.rmtree(dest, ignore_errors=True)
            if attempt == 4:
                raise FoveaError(f"could not register {name}: other processes keep taking the next version") from None
            continue
        if version == 1:  # a model's first version is its production version until a deployment says otherwise
            set_alias(name, version, "production", store=store)
        if alias:
            set_alias(name, version, alias, store=store)
        return _version(store, row)
    raise AssertionError("unreachable")


def versions(name: str | None = None, *, store: Store | None = None) -> list[Version]:
    store = store or Store()
    with store.session() as s:
        q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)
        rows = s.scalars(q.where(ModelVersion.name == name) if name else q).all()
    if name and not rows:
        raise FoveaError(f"no model named {name!r} in the registry ({store.safe_url}); add one: "
                         f"fovea registry add RUN --name {name}")
    return [_version(store, r) for r in rows]


def resolve(ref: str, *, store: Store | None = None) -> Version:
    """``NAME`` (its production alias, else its newest version), ``NAME:VERSION`` or ``NAME:ALIAS``."""
    store = store or Store()
    name, _, which = ref.partition(":")
    with store.session() as s:
        if not which:
            row = s.scalar(select(ModelVersion).join(Alias, Alias.version_id == ModelVersion.id)
                           .where(Alias.name == name, Alias.alias == "production"))
            if row is None:
                row = s.scalar(select(ModelVersion).where(ModelVersion.name == name)
                               .order_by(ModelVersion.version.desc()).limit(1))
        elif which.isdigit():
            row = s.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == int(which)))
        else:
            row = s.scalar(select(ModelVersion).join(Alias, Alias.version_id == ModelVersion.id)
                           .where(Alias.name == name, Alias.alias == which))
    if row is None:
        known = ", ".join(v.ref for v in versions(store=store) if v.name == name) or "none"
        raise FoveaError(f"{ref!r} is not in the registry (versions of {name!r}: {known})")
    return _version(store, row)


def set_alias(name: str, version: int, alias: str, *, store: Store | None = None) -> Version:
    """Point ``alias`` of ``name`` at ``version`` (moving it if it pointed elsewhere)."""
    store = store or Store()
    _check_name("alias", alias)
    target = resolve(f"{name}:{version}", store=store)
    with store.session() as s:
        row = s.scalar(select(Alias).where(Alias.name == name, Alias.alias == alias))
        if row is None:
            s.add(Alias(name=name, alias=alias, version_id=target.id))
        else:
            row.version_id = target.id
    return resolve(f"{name}:{version}", store=store)


def verify(v: Version) -> None:
    """FoveaError unless the version's files are there and are the ones registered."""
    folder = Path(v.path)
    if not (folder / META).exists():
        raise FoveaError(f"{v.ref}: its files are gone from {folder}")
    if digest(folder) != v.digest:
        raise FoveaError(f"{v.ref}: the files in {folder} changed since they were registered (digest mismatch)")


def open_version(v: Version, device: str = "auto", unknown: bool = True) -> Any:
    """Load a registered version after checking its files are the ones registered (``unknown=False``: closed-set)."""
    from fovea.runtime import load

    verify(v)
    return load(Path(v.path), device, unknown=unknown)


@dataclass
class Located:
    """Where a model named on a command line is: a registered version, or a model folder (version 0)."""

    name: str
    version: int  # 0: a model folder outside the registry
    path: Path
    registered: Version | None = None


def locate(ref: str, *, store: Store | None = None, db: str | None = None) -> Located:
    """A model folder (named after the folder, version 0) or a registry reference: NAME, NAME:VERSION, NAME:ALIAS.

    The store (``store``, else the one at ``db``) is opened only for a registry reference.
    """
    folder = Path(ref)
    if is_model_folder(folder):
        return Located(folder.resolve().name, 0, folder)
    if ":" not in ref and ("/" in ref or folder.exists()):
        raise FoveaError(f"{ref} is not a model folder (no {META}) and not a registry name")
    v = resolve(ref, store=store or Store(db))
    return Located(v.name, v.version, Path(v.path), v)


def open_model(ref: str, device: str = "auto", store: Store | None = None,
               unknown: bool = True) -> tuple[str, int, Any, str]:
    """(name, version, loaded model, digest) for a model folder (version 0) or a registry reference; a registered
    version's files are checked against its digest first."""
    from fovea.runtime import load

    where = locate(ref, store=store)
    if where.registered is not None:
        return where.name, where.version, open_version(where.registered, device, unknown), where.registered.digest
    return where.name, 0, load(where.path, device, unknown=unknown), ""
