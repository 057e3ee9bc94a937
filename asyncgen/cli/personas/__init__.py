"""``asyncgen personas``: the persona pipelines (:mod:`.pipeline`: from-text, expand) and
tools (:mod:`.tools`: sample, filter, stats, dedup) over :mod:`asyncgen.personas`."""

from __future__ import annotations

import argparse
from typing import Any

from asyncgen.cli.personas import pipeline, tools

__all__ = ["add_command"]


def add_command(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``asyncgen personas`` and its subcommands."""
    personas = sub.add_parser(
        "personas",
        help="create, expand, select and deduplicate persona shards",
        description="Persona shards are JSON lines with a 'persona' field (plain or .zst). "
        "These commands make them from text (from-text), grow them through relationships "
        "(expand), pick some (sample, filter), describe them (stats) and remove copies "
        "(dedup).",
    )
    commands = personas.add_subparsers(dest="persona_command", required=True)
    pipeline.add_commands(commands)
    tools.add_commands(commands)
