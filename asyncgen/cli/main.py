"""The ``asyncgen`` command: the parser, and one place that turns what a command raised into
an exit status (see :mod:`asyncgen.cli.exits`). Each command lives in its own module and
registers itself with ``add_command(sub)``, setting ``handler(args) -> exit status``."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from asyncgen._version import __version__
from asyncgen.cli import batches, bench, demo, jobtools, mock_server, personas, prompts, run
from asyncgen.cli.console import error, say
from asyncgen.cli.exits import Exit
from asyncgen.core.errors import AsyncgenError
from asyncgen.engine.runtime import tune_gc

__all__ = ["build_parser", "entry", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncgen",
        description="Persona-driven synthetic data generation against OpenAI-compatible APIs: "
        "render a prompt template for every persona, send the requests concurrently within "
        "rate limits, retry what can be retried, and write every result exactly once.",
        epilog=run.EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"asyncgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_command(sub)
    demo.add_command(sub)
    mock_server.add_command(sub)
    bench.add_command(sub)
    personas.add_command(sub)
    jobtools.add_commands(sub)
    batches.add_command(sub)
    prompts.add_command(sub)
    return parser


def entry() -> int:
    """The ``asyncgen`` command: :func:`main` in a process tuned for long jobs (the
    garbage collector, see :func:`asyncgen.tune_gc`). ``main`` alone leaves the process as
    it is, for callers that run it in their own."""
    tune_gc()
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: this process's arguments); its exit status."""
    typed = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(typed)
    args.argv = ["asyncgen", *typed]  # bench keeps the command line as typed in its report
    try:
        return int(args.handler(args))
    except AsyncgenError as exc:
        error(str(exc))
        return Exit.USAGE
    except KeyboardInterrupt:
        say("interrupted")
        return Exit.INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (``asyncgen prompts | head -1``): nothing is left to
        # tell it. Later writes, and the flush at exit, go nowhere instead of failing again.
        _silence_stdout()
        return Exit.OK
    except Exception:
        # Not 1, which scripts read as "finished with some failures".
        traceback.print_exc()
        say(
            "internal error (a bug; please report it with the traceback above); "
            "committed results are safe, rerun to resume"
        )
        return Exit.INTERNAL


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # no descriptor behind sys.stdout: nothing to flush at exit
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
