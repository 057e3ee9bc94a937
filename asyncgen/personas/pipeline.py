"""Persona creation as resumable jobs: ``asyncgen personas from-text`` and ``expand``.

Each stage is an ordinary job in its own output directory, so the exactly-once bookkeeping of
``asyncgen run`` applies, followed by the conversion of its results into a persona shard::

    from-text  DIR/job/                        texts -> text_to_persona
               DIR/personas.jsonl.zst
    expand     DIR/round-1/job/                the given personas -> persona
               DIR/round-1/round-1.jsonl.zst
               DIR/round-2/job/                round 1's shard -> persona
               DIR/round-2/round-2.jsonl.zst   ...

A stage whose shard exists is done. Otherwise its job runs (a finished job sends nothing) and,
once every item is committed, its results are written to a temporary file, fsynced and renamed:
a crash leaves no shard or a complete one, never a partial one. That matters because the next
round's ids are this shard's line numbers: once it exists, it never changes. Rounds get shard
names of their own for the same reason (a ``custom_id`` starts with its input's shard name).

Every persona line carries its provenance: ``id`` (the ``custom_id`` of the result it is),
``round``, ``template``, ``model``, and ``source`` (from text: the text shard and line) or
``parent``, ``parent_persona`` and ``origin`` (expanded: the text line it descends from, when
known), so a persona stays traceable to its text through any number of rounds.

Handlers run one event loop per job; the conversion is plain blocking code between them.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import zstandard

from asyncgen.core.errors import ConfigError, OutputError
from asyncgen.core.records import Source
from asyncgen.job.config import JobConfig, job_spec
from asyncgen.storage.jobdir import read_manifest, shards, standing_failures
from asyncgen.storage.shards import fsync_path, iter_lines
from asyncgen.storage.sources import expand_inputs, shard_name
from asyncgen.storage.store import fingerprint, other_job

__all__ = ["Persona", "StageReport", "add_commands", "clean_persona", "convert"]

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
    tmp = shard.with_name(shard.name + ".tmp")
    failed = len(standing_failures(job))
    results = personas = 0
    buf = bytearray()
    try:
        with open(tmp, "wb") as f:
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
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, shard)
        fsync_path(shard.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {shard}: {exc.strerror or exc}") from exc
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


# --- the commands ---------------------------------------------------------------------------


def _say(message: str) -> None:
    with contextlib.suppress(OSError):  # a closed stderr does not change the outcome
        print(f"asyncgen: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One pipeline process per directory: two would convert into the same temporary file."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot use output directory {root}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise OutputError(
                f"output directory {root} is in use by another asyncgen process"
            ) from exc
        yield
    finally:
        os.close(fd)


def _run_stage(
    args: argparse.Namespace,
    config: JobConfig,
    shard: Path,
    *,
    label: str,
    intake: str,
    round_: int,
) -> StageReport | None:
    """Run or resume one stage; None when it was interrupted."""
    from asyncgen.cli.args import run_async
    from asyncgen.cli.main import EXIT_INTERRUPTED, run_job

    job = Path(config.output)
    if shard.exists():
        # Done earlier, but by the same job? Another model or template must not pass for it.
        spec = job_spec(config)
        old = read_manifest(job)
        if old.get("fingerprint") != fingerprint(spec):
            raise OutputError(other_job(job, old.get("spec", {}), spec))
        report = _done_earlier(job, shard)
        _say(f"{label}: done earlier → {_outcome(report)} → {shard}")
        return report
    _say(f"{label}: {intake} → {job}")
    code = run_async(
        run_job(
            config,
            api_key=os.environ.get(args.api_key_env) or None,
            progress_interval=args.progress_interval,
            quiet=args.quiet,
        )
    )
    if code == EXIT_INTERRUPTED:
        return None
    report = convert(job, shard, round_=round_, samples=config.samples)
    _say(f"{label}: {report.inputs:,} in → {_outcome(report)} → {shard}")
    missing = []
    if report.failed:
        missing.append(f"{report.failed:,} failed items ({job}/failures-*.jsonl.zst)")
    if report.bad_lines:
        missing.append(f"{report.bad_lines:,} bad input lines ({job}/errors-*.jsonl.zst)")
    if missing:
        _say(f"{label}: the shard holds the successes only; left out: {', '.join(missing)}")
    return report


def _outcome(r: StageReport) -> str:
    empty = "" if r.empty is None else f", {r.empty:,} empty"
    return f"{r.personas:,} personas ({r.failed:,} failed{empty}, {r.bad_lines:,} bad input lines)"


def _status(reports: list[StageReport]) -> int:
    from asyncgen.cli.main import EXIT_FAILURES, EXIT_OK

    return EXIT_FAILURES if any(r.failed or r.bad_lines for r in reports) else EXIT_OK


def _from_text(args: argparse.Namespace) -> int:
    from asyncgen.cli.main import EXIT_INTERRUPTED, job_config_from_args

    root = Path(args.output)
    config = msgspec.structs.replace(job_config_from_args(args), output=str(root / "job"))
    with _locked(root):
        report = _run_stage(
            args,
            config,
            root / "personas.jsonl.zst",
            label="from-text",
            intake="texts from " + ", ".join(args.input),
            round_=0,
        )
    return EXIT_INTERRUPTED if report is None else _status([report])


def _expand(args: argparse.Namespace) -> int:
    from asyncgen.cli.main import EXIT_INTERRUPTED, job_config_from_args

    root, rounds = Path(args.output), args.rounds
    names = {f"round-{r}" for r in range(1, rounds)}
    for path in expand_inputs(args.input):
        if shard_name(path) in names:
            raise ConfigError(
                f"input {path} has the shard name {shard_name(path)!r}, which a later round's "
                "input also has; their ids would collide, rename it"
            )
    base = job_config_from_args(args)
    reports: list[StageReport] = []
    inputs, field = list(args.input), args.persona_field
    intake = "personas from " + ", ".join(inputs)
    with _locked(root):
        for r in range(1, rounds + 1):
            stage = root / f"round-{r}"
            shard = stage / f"round-{r}.jsonl.zst"
            config = msgspec.structs.replace(
                base, inputs=inputs, output=str(stage / "job"), persona_field=field
            )
            report = _run_stage(
                args, config, shard, label=f"round {r}/{rounds}", intake=intake, round_=r
            )
            if report is None:
                return EXIT_INTERRUPTED
            reports.append(report)
            inputs, field = [str(shard)], "persona"
            intake = f"{report.personas:,} personas in"
    chain = " → ".join(f"{r.personas:,}" for r in reports)
    _say(f"expand: {chain} personas in {rounds} rounds; the last in {shard}")
    return _status(reports)


def _add_options(p: argparse.ArgumentParser, *, prompt: str) -> None:
    from asyncgen.cli.main import add_request_arguments

    p.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="DIR",
        help="pipeline directory (created): jobs and persona shards go under it",
    )
    p.add_argument(
        "--prompt",
        "-p",
        default=prompt,
        metavar="NAME|PATH",
        help="template (default: %(default)s)",
    )
    add_request_arguments(p, model_required=True, samples_help="personas made from each input line")


_EPILOG = (
    "Rerun the same command to resume after a crash or Ctrl-C. Exit status: 0 every item "
    "became a persona or an empty answer; 1 finished, but some items failed or input lines "
    "were bad (the shards hold the successes); 2 usage/input/setup error; 130 interrupted."
)


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register this module's ``asyncgen personas`` subcommands."""
    from asyncgen.cli.args import add_inputs, positive_int

    p = sub.add_parser(
        "from-text",
        help="make personas from texts: who would write, read, like or dislike each one",
        description="Every line of the text shards becomes a request (template "
        "text_to_persona); the job runs in DIR/job and its answers become the persona shard "
        "DIR/personas.jsonl.zst, each with the text shard and line it came from.",
        epilog=_EPILOG,
    )
    add_inputs(p, "text shards (.jsonl or .jsonl.zst) or glob patterns")
    p.add_argument(
        "--text-field",
        dest="persona_field",
        default="text",
        metavar="FIELD",
        help="input field holding the text (default: %(default)s)",
    )
    _add_options(p, prompt="text_to_persona")
    p.set_defaults(handler=_from_text)

    p = sub.add_parser(
        "expand",
        help="make new personas from personas (persona-to-persona), for K rounds",
        description="Round 1 makes a persona related to each input persona (template "
        "persona), round r one for each persona of round r-1. Round r runs in DIR/round-r/job "
        "and writes DIR/round-r/round-r.jsonl.zst; each new persona names its parent and the "
        "text line its line descends from (origin), when known.",
        epilog=_EPILOG,
    )
    add_inputs(p, "persona shards (.jsonl or .jsonl.zst) or glob patterns")
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        metavar="K",
        help="rounds of expansion (default: %(default)s)",
    )
    p.add_argument(
        "--persona-field",
        default="persona",
        metavar="FIELD",
        help="field of the input shards holding the persona (default: %(default)s)",
    )
    _add_options(p, prompt="persona")
    p.set_defaults(handler=_expand)
