"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class FoveaError(Exception):
    """A problem with the user's input or setup, with a message that says what to do."""


class ImageError(FoveaError):
    """One image could not be used; ``reason`` is short enough for a quarantine list."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
