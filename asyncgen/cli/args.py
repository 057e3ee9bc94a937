"""Command-line value types (for argparse ``type=``) and the CLI's event-loop runner, shared
by every ``asyncgen`` subcommand so that they check and word things alike."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = [
    "add_inputs",
    "int_at_least",
    "json_object",
    "non_negative_int",
    "number",
    "positive_float",
    "positive_int",
    "run_async",
]

_T = TypeVar("_T")


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


FORMATS = (
    "JSON lines (.jsonl, .ndjson; plain, .zst, .gz or .xz, told by content) or Parquet "
    "(.parquet, a row a line); files, directories (their input files, sorted), globs, or "
    "URLs read through fsspec (s3://, gs://, hf://, https://; the remote extra)"
)


def add_inputs(p: argparse.ArgumentParser, help: str, *, required: bool = True) -> None:
    """The ``--input/-i FILE...`` option every command that reads shards has (repeatable,
    several files or globs each time); ``help`` says what they hold, the formats follow."""
    p.add_argument(
        "--input",
        "-i",
        nargs="+",
        action="extend",
        required=required,
        metavar="FILE",
        help=f"{help}: {FORMATS}",
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a command's coroutine on uvloop (the library itself never installs a loop)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(coro)
    return uvloop.run(coro)
