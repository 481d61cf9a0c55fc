"""The ``fovea`` command: each command parses its options, calls one function of the library and renders the result.

Commands live in modules by stage (``_data``, ``_train``, ``_use``, ``_compress``, ``_serve``, ``_registry``,
``_monitor``); what they share - options declared once, logging, examples - is in ``_common``, the training
options generated from ``TrainConfig`` in ``_options``, and every table and line they print in ``_render``.
"""

from __future__ import annotations

import os
import sys

import typer

from fovea.cli import _compress, _data, _monitor, _registry, _serve, _train, _use  # noqa: F401 - register commands
from fovea.cli._common import app
from fovea.errors import FoveaError

__all__ = ["app", "main"]


def main() -> None:
    """The console script: errors in what the user gave are one ``error:`` line and exit 2; a bug is one line
    and exit 1 (``FOVEA_DEBUG=1`` shows the traceback)."""
    try:
        app()
    except FoveaError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:  # a path given that cannot be read or written: an existing file as --out, a full disk
        where = f": {e.filename}" if e.filename else ""
        typer.echo(f"error: {e.strerror or e}{where}", err=True)
        sys.exit(2)
    except UnicodeDecodeError as e:
        typer.echo(f"error: a file Fovea reads as text (a CSV, a model.json) is not UTF-8: {e.reason} at byte "
                   f"{e.start}; save it as UTF-8", err=True)
        sys.exit(2)
    except MemoryError:
        typer.echo("error: out of memory; use a smaller --image-size or --batch-size, or fewer images", err=True)
        sys.exit(2)
    except Exception as e:  # a bug: one line for the user, the traceback on request
        if os.environ.get("FOVEA_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {e}\n"
                   "This is a bug in Fovea; run again with FOVEA_DEBUG=1 for the traceback and report it.", err=True)
        sys.exit(1)
