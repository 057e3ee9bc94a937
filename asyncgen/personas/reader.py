"""Streaming persona shards: :class:`PersonaReader` and the bad lines it passes over.

Every persona tool (sample, filter, stats, dedup) reads its input shards (``.jsonl`` or
``.jsonl.zst``) through :class:`PersonaReader`, in batches, so memory does not grow with input
size. A bad line (not JSON, not an object, no persona string) is counted and handed to
``on_bad`` with its file and line; ``strict`` makes the first one an
:class:`~asyncgen.core.errors.InputError` instead. A corrupt or truncated ``.zst`` shard is one
bad entry (its good lines before the damage are read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from asyncgen.core.errors import ConfigError, InputError
from asyncgen.core.records import Line, bad_utf8
from asyncgen.storage.sources import Input, ShardReader, expand_inputs

__all__ = ["BadLine", "Persona", "PersonaReader", "refuse_overwrite"]

_BATCH = 2048


class Persona(NamedTuple):
    """One good input line and its persona text."""

    line: Line
    text: str


class BadLine(NamedTuple):
    """An input line (or, with ``lineno`` None, a shard) that was left out, and why."""

    path: str
    shard: str
    lineno: int | None
    reason: str

    def __str__(self) -> str:
        where = self.path if self.lineno is None else f"{self.path}:{self.lineno}"
        return f"{where}: {self.reason}"


class PersonaReader:
    """Streams the personas of several shards in order, in batches; counts what it passes over.

    ``on_bad`` hears of every bad line; with ``strict`` the first one raises
    :class:`InputError` instead. A corrupt or truncated ``.zst`` shard is one bad entry
    (its good lines before the damage are read) and reading goes on with the next shard.
    """

    def __init__(
        self,
        inputs: Sequence[str],
        *,
        field: str = "persona",
        strict: bool = False,
        on_bad: Callable[[BadLine], None] | None = None,
    ) -> None:
        self.paths = expand_inputs(inputs)
        self.field = field
        self.strict = strict
        self.on_bad = on_bad
        self.records = 0
        self.bad = 0
        view = msgspec.defstruct("PersonaView", [("text", object, None)], rename={"text": field})
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(view)

    def batches(self, size: int = _BATCH) -> Iterator[list[Persona]]:
        for path in self.paths:
            reader = ShardReader(path)
            while True:
                try:
                    lines = reader.read_batch(size)
                except InputError as exc:
                    self._bad(BadLine(str(path), reader.shard, None, exc.reason))
                    break
                if not lines:
                    break
                batch = []
                for line in lines:
                    text = self._text(line)
                    if text is not None:
                        batch.append(Persona(line, text))
                self.records += len(batch)
                if batch:
                    yield batch

    def __iter__(self) -> Iterator[Persona]:
        for batch in self.batches():
            yield from batch

    def _text(self, line: Line) -> str | None:
        try:
            text = self._decoder.decode(line.raw).text
        except msgspec.ValidationError:
            reason = "not a JSON object"
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            reason = bad_utf8(line.raw, exc) or str(exc)  # "JSON is malformed: ... (byte N)"
        except RecursionError as exc:
            reason = f"JSON nested too deeply ({exc})"
        else:
            if isinstance(text, str) and text.strip():
                return text
            if text is None:
                reason = f"no {self.field!r} field"
            elif isinstance(text, str):
                reason = f"{self.field!r} is empty"
            else:
                reason = f"{self.field!r} must be a string, not {type(text).__name__}"
        self._bad(BadLine(line.path, line.shard, line.lineno, reason))
        return None

    def _bad(self, bad: BadLine) -> None:
        if self.strict:
            raise InputError(bad.reason, path=bad.path, line=bad.lineno)
        self.bad += 1
        if self.on_bad is not None:
            self.on_bad(bad)


def refuse_overwrite(inputs: Sequence[Input], *outputs: str | Path) -> None:
    """Refuse outputs that are one of the inputs, or one another: the temporary file renamed
    over an input would lose it."""
    resolved = {p.resolve() for p in inputs}
    for out in outputs:
        if Path(out).resolve() in resolved:
            raise ConfigError(f"output {out} is one of the inputs; write to another file")
    if len(outputs) > 1 and len({Path(o).resolve() for o in outputs}) < len(outputs):
        raise ConfigError("--report must differ from --output")
