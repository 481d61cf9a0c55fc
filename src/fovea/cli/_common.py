"""What every command shares: logging, the help's examples, and the options declared once as ``Annotated`` aliases."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fovea.errors import FoveaError

STARTED = time.time()  # a --time budget counts the command's own start-up (importing PyTorch is ~2 s)

app = typer.Typer(
    name="fovea",
    help="Fovea: from a folder of labelled images to a classifier trained well and evaluated honestly.\n\n"
    "Start with `fovea demo`, or `fovea check DATA` then `fovea train DATA`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

DataArg = Annotated[Path, typer.Argument(help="A folder (DATA/CLASS/*, DATA/train|val/CLASS/*) or a CSV path,label[,group].")]
RunArg = Annotated[Path, typer.Argument(help="A run folder (model.safetensors + model.json).")]
ModelRefArg = Annotated[str, typer.Argument(help="A model folder, or a registry reference: NAME, NAME:VERSION, NAME:ALIAS.")]
PathsArg = Annotated[list[Path], typer.Argument(help="Image files or folders.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DeviceOption = Annotated[str, typer.Option(help="auto | cpu | cuda")]
NoUnknownOption = Annotated[bool, typer.Option("--no-unknown", help="Closed-set: always answer one of the model's "
                                               "classes, even where its artifact can answer 'unknown' for images "
                                               "of none of them.")]
CacheOption = Annotated[str, typer.Option(metavar="auto|memory|disk|none", help=(
    "Where the decoded images live: auto (in memory if they fit in half the free memory, else disk), memory, "
    "disk (read from $FOVEA_HOME/cache a block at a time: memory stays flat), none (in memory, no cache entry "
    "kept)."))]
DbOption = Annotated[str | None, typer.Option("--db", envvar="FOVEA_DB",
                                              help="Database URL (default sqlite:///$FOVEA_HOME/fovea.db; "
                                                   "postgresql://user:pass@host/db for several replicas).")]


def setup_logging(quiet: bool = False) -> None:
    """Fovea's log on stderr through rich (stdout carries the results: --json output must stay parseable)."""
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False,
                          rich_tracebacks=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("fovea").setLevel(level)


def examples(*lines: str) -> str:
    """A command's epilog: its examples, one per paragraph (every --help ends with some)."""
    return "**Examples**\n\n" + "\n\n".join(f"`{line}`" for line in lines)


def echo_json(obj: Any, **kwargs: Any) -> None:
    typer.echo(json.dumps(obj, **kwargs))


def parse_arch(items: list[str] | None) -> dict[str, Any]:
    """--arch KEY=VALUE (repeatable) as architecture keyword arguments; VALUE is JSON where it parses, a list when
    it has commas (widths=32,64,128)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise FoveaError(f"--arch expects KEY=VALUE (e.g. widths=32,64,128,256), got {item!r}")
        key, value = item.split("=", 1)
        vals: list[Any] = []
        for part in (p.strip() for p in value.split(",")):
            try:
                vals.append(json.loads(part))
            except ValueError:
                vals.append(part)
        out[key.strip().replace("-", "_")] = vals if len(vals) > 1 else vals[0]
    return out


def parse_params(items: list[str] | None) -> dict[str, str]:
    """--param KEY=VALUE (repeatable)."""
    params: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise FoveaError(f"--param expects KEY=VALUE (e.g. clip=3), got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = value
    return params


def expand_files(paths: list[Path]) -> list[Path]:
    """Files as given, and every file under a folder (hidden ones skipped), in order."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.exists():
            files.append(p)
        else:
            raise FoveaError(f"{p} does not exist")
    return files
