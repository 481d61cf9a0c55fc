"""Options generated from ``TrainConfig``: `fovea train`, `lr-find` and `compare` take them from
``fovea.training.OPTIONS`` (help, flags, parser) and the dataclass (type, default), so each is declared once."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer


def _parameters(names: Sequence[str] | None, help: dict[str, str]) -> list[inspect.Parameter]:
    from fovea.training import OPTIONS, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = []
    for name in names or list(OPTIONS):
        opt, f = OPTIONS[name], fields[name]
        kind = opt.type or hints[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if opt.type is not None:
            default = None  # given as another type: passed on only when the user gave it
        option = typer.Option(*opt.flags, help=help.get(name, opt.help), parser=opt.parser, metavar=opt.metavar)
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                     annotation=Annotated[kind, option]))
    return out


def train_options(*names: str, help: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``TrainConfig``'s options ``names`` (all of ``OPTIONS`` when none are named) to a command whose function
    takes them as ``**options``, after its first parameter (the data); ``help`` rewords some for this command."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
        # the command's argument (DATA) first, then the training options, then the command's own options
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[1:]]
        params = own[:1] + _parameters(names or None, help or {}) + rest
        fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return fn
    return wrap


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The options to pass on: None means "not given" (the dataclass's default applies)."""
    return {k: v for k, v in options.items() if v is not None}
