"""How an error reads on a terminal: one line, for the `ampo` command and for a stage run in its own process."""

from __future__ import annotations

import os
import re

EXPECTED_ERRORS = ("ValueError", "FileNotFoundError", "RunLockedError", "StageProcessError", "RewardFunctionError")
LANCE_IO = re.compile(r"lance error: LanceError\(IO\): (?P<what>.*?)(?:, /\S+\.rs:\d+:\d+)?$", re.DOTALL)


class MissingManifestError(FileNotFoundError):
    """A checkpoint (folder or object-store prefix) without its manifest: unfinished or foreign, never used."""


def error_line(exc: BaseException, store_uri: str | None = None) -> str:
    """The one line an error prints: its message for errors ampo raises on purpose, the path and the reason for
    I/O errors (a file, a read-only or full disk), the exception type and message for anything else."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror and (exc.filename or exc.filename2):
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p)
        text = f"{paths}: {exc.strerror}"
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror} (errno {exc.errno})" + (f"; store {store_uri}" if store_uri else "")
    elif (match := LANCE_IO.match(text)) is not None:
        text = f"store {store_uri or '?'}: cannot write: {match['what']}"
    elif not any(t.__name__ in EXPECTED_ERRORS for t in type(exc).__mro__):
        text = f"{type(exc).__name__}: {text} (run with --debug for the traceback)"
    return " ".join(text.split())


def debug_enabled() -> bool:
    return os.environ.get("AMPO_DEBUG", "") not in ("", "0")
