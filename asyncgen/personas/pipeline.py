"""Persona creation as resumable jobs: :func:`from_text` and :func:`expand`.

Each stage is an ordinary job in its own output directory, so the exactly-once bookkeeping of
``asyncgen run`` applies, followed by the conversion of its results into a persona shard::

    from-text  DIR/job/                        texts -> text_to_persona
               DIR/personas.jsonl.zst
    expand     DIR/round-1/job/                the given personas -> persona
               DIR/round-1/round-1.jsonl.zst
               DIR/round-2/job/                round 1's shard -> persona
               DIR/round-2/round-2.jsonl.zst   ...

A stage whose shard exists is done. Otherwise its job runs (a finished job sends nothing) and,
once every item is committed, its results are written with
:func:`~asyncgen.storage.files.atomic_write`: a crash leaves no shard or a complete one, never
a partial one. That matters because the next round's ids are this shard's line numbers: once
it exists, it never changes. Rounds get shard names of their own for the same reason (a
``custom_id`` starts with its input's shard name).

Every persona line carries its provenance: ``id`` (the ``custom_id`` of the result it is),
``round``, ``template``, ``model``, and ``source`` (from text: the text shard and line) or
``parent``, ``parent_persona`` and ``origin`` (expanded: the text line it descends from, when
known), so a persona stays traceable to its text through any number of rounds.

Jobs run through the :data:`JobRunner` the caller passes in (the CLI's brings progress lines
and Ctrl-C handling, and one event loop per job); the conversion is plain blocking code between
them, and one process at a time works in a pipeline directory (:class:`DirLock`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zstandard

from asyncgen.core.errors import ConfigError, OutputError
from asyncgen.core.records import Source
from asyncgen.engine.stats import Statistics
from asyncgen.job.config import JobConfig, job_spec
from asyncgen.storage.files import DirLock, atomic_write
from asyncgen.storage.manifest import fingerprint, other_job, read_manifest
from asyncgen.storage.shards import iter_lines
from asyncgen.storage.sources import expand_inputs, shard_name
from asyncgen.storage.view import shards, standing_failures

__all__ = [
    "JobRunner",
    "Notify",
    "Persona",
    "StageReport",
    "clean_persona",
    "convert",
    "expand",
    "from_text",
]

JobRunner = Callable[[JobConfig], Statistics]
"""Runs (or resumes) one job and returns its final statistics; ``finished`` is False when it
was stopped before the end."""
Notify = Callable[[str], None]
"""Hears one line about each step of a pipeline ("from-text: done earlier → ...")."""

_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}
_FRAME_BYTES = 1 << 20  # uncompressed bytes per zstd frame: bounds a reader's memory


class Persona(msgspec.Struct, omit_defaults=True):
    """One line of a persona shard: the persona and where it came from."""

    persona: str
    id: str
    """The ``custom_id`` of the result this persona is."""
    round: int
    """0 made from text; r made in round r of ``expand``."""
    template: str | None
    model: str | None
    source: Source | None = None
    """Made from text: the text shard and line."""
    parent: str | None = None
    """Expanded: the ``id`` of the persona it was made from (else its ``shard:line``)."""
    parent_persona: str | None = None
    origin: Any = None
    """Expanded: the parent's ``origin``, or a text-made parent's ``source``."""


class _Done(msgspec.Struct):
    """The fields of a committed result that a persona needs."""

    custom_id: str
    output: str | None
    model: str | None
    template: str | None
    persona: str | None
    source: Source
    meta: dict[str, Any] = {}


class StageReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one stage produced; ``inputs`` and ``empty`` are None for a stage done earlier."""

    personas: int
    failed: int
    bad_lines: int
    inputs: int | None = None
    empty: int | None = None


def clean_persona(text: str | None) -> str:
    """The model's answer as a persona: stripped, without quotes around the whole of it."""
    text = (text or "").strip()
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        inner = text[1:-1]
        if text[0] in inner or text[-1] in inner:
            break  # '"a" and "b"' is quoted twice, not once around the whole
        text = inner.strip()
    return text


def _parent_id(done: _Done) -> str:
    parent = done.meta.get("id")
    return parent if isinstance(parent, str) else f"{done.source.shard}:{done.source.line}"


def _persona(done: _Done, text: str, round_: int) -> Persona:
    if round_ == 0:
        return Persona(text, done.custom_id, 0, done.template, done.model, source=done.source)
    meta = done.meta
    return Persona(
        text,
        done.custom_id,
        round_,
        done.template,
        done.model,
        parent=_parent_id(done),
        parent_persona=done.persona,
        origin=meta["origin"] if "origin" in meta else meta.get("source"),
    )


def _count(paths: list[Path]) -> int:
    return sum(1 for path in paths for _ in iter_lines(path))


def convert(job: Path, shard: Path, *, round_: int, samples: int = 1) -> StageReport:
    """Write the successful results of the finished job in ``job`` as the persona shard
    ``shard``, atomically; deterministic, so doing it again gives the same file."""
    decoder = msgspec.json.Decoder(_Done)
    encoder = msgspec.json.Encoder()
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    failed = len(standing_failures(job))
    results = personas = 0
    buf = bytearray()
    with atomic_write(shard) as f:
        for path in shards(job, "results"):
            for line in iter_lines(path):
                done = decoder.decode(line)
                results += 1
                text = clean_persona(done.output)
                if not text:
                    continue
                personas += 1
                encoder.encode_into(_persona(done, text, round_), buf, -1)
                buf.extend(b"\n")
                if len(buf) >= _FRAME_BYTES:
                    f.write(compressor.compress(buf))
                    buf.clear()
        if buf or not personas:
            f.write(compressor.compress(buf))  # an empty shard is still a zstd file
    bad = _count(shards(job, "errors"))
    return StageReport(
        personas=personas,
        failed=failed,
        bad_lines=bad,
        inputs=(results + failed) // samples + bad,
        empty=results - personas,
    )


def _done_earlier(job: Path, shard: Path) -> StageReport:
    return StageReport(
        personas=_count([shard]),
        failed=len(standing_failures(job)),
        bad_lines=_count(shards(job, "errors")),
    )


def _remove_stale_temporaries(shard: Path) -> None:
    # A crash while converting leaves AtomicFile's ".NAME.*.tmp" beside the shard; under the
    # pipeline's lock nobody else can be writing one.
    for stale in shard.parent.glob(f".{shard.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _outcome(r: StageReport) -> str:
    empty = "" if r.empty is None else f", {r.empty:,} empty"
    return f"{r.personas:,} personas ({r.failed:,} failed{empty}, {r.bad_lines:,} bad input lines)"


def _run_stage(
    config: JobConfig,
    shard: Path,
    *,
    run: JobRunner,
    notify: Notify,
    label: str,
    intake: str,
    round_: int,
) -> StageReport | None:
    """Run or resume one stage; None when it was interrupted."""
    job = Path(config.output)
    if shard.exists():
        # Done earlier, but by the same job? Another model or template must not pass for it.
        spec = job_spec(config)
        old = read_manifest(job)
        if old.fingerprint != fingerprint(spec):
            raise OutputError(other_job(job, old.spec, spec))
        report = _done_earlier(job, shard)
        notify(f"{label}: done earlier → {_outcome(report)} → {shard}")
        return report
    notify(f"{label}: {intake} → {job}")
    if not run(config).finished:
        return None
    _remove_stale_temporaries(shard)
    report = convert(job, shard, round_=round_, samples=config.samples)
    notify(f"{label}: {report.inputs:,} in → {_outcome(report)} → {shard}")
    missing = []
    if report.failed:
        missing.append(f"{report.failed:,} failed items ({job}/failures-*.jsonl.zst)")
    if report.bad_lines:
        missing.append(f"{report.bad_lines:,} bad input lines ({job}/errors-*.jsonl.zst)")
    if missing:
        notify(f"{label}: the shard holds the successes only; left out: {', '.join(missing)}")
    return report


def from_text(
    config: JobConfig, root: Path, *, run: JobRunner, notify: Notify
) -> StageReport | None:
    """Make the persona shard ``root/personas.jsonl.zst`` from the texts ``config`` reads
    (its job runs in ``root/job``); None when the job was interrupted (rerun to resume)."""
    # A persona cut at max_tokens is half a sentence: retried, unless the template accepts it.
    config = msgspec.structs.replace(config, output=str(root / "job"), accept_length=False)
    with DirLock(root):
        return _run_stage(
            config,
            root / "personas.jsonl.zst",
            run=run,
            notify=notify,
            label="from-text",
            intake="texts from " + ", ".join(config.inputs),
            round_=0,
        )


def expand(
    config: JobConfig, root: Path, *, rounds: int, run: JobRunner, notify: Notify
) -> list[StageReport] | None:
    """Grow the personas ``config`` reads through ``rounds`` rounds, round r in
    ``root/round-r/``; the report of each round, or None when one was interrupted."""
    names = {f"round-{r}" for r in range(1, rounds)}
    for path in expand_inputs(config.inputs):
        if shard_name(path) in names:
            raise ConfigError(
                f"input {path} has the shard name {shard_name(path)!r}, which a later round's "
                "input also has; their ids would collide, rename it"
            )
    reports: list[StageReport] = []
    inputs, field = list(config.inputs), config.persona_field
    intake = "personas from " + ", ".join(inputs)
    with DirLock(root):
        for r in range(1, rounds + 1):
            stage = root / f"round-{r}"
            shard = stage / f"round-{r}.jsonl.zst"
            round_config = msgspec.structs.replace(
                config,
                inputs=inputs,
                output=str(stage / "job"),
                persona_field=field,
                accept_length=False,  # as in from_text
            )
            report = _run_stage(
                round_config,
                shard,
                run=run,
                notify=notify,
                label=f"round {r}/{rounds}",
                intake=intake,
                round_=r,
            )
            if report is None:
                return None
            reports.append(report)
            inputs, field = [str(shard)], "persona"
            intake = f"{report.personas:,} personas in"
    chain = " → ".join(f"{r.personas:,}" for r in reports)
    notify(f"expand: {chain} personas in {rounds} rounds; the last in {shard}")
    return reports
