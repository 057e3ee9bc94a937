"""``asyncgen prompts``: the shipped prompt templates, one a line."""

from __future__ import annotations

import argparse
from typing import Any

from asyncgen.cli.console import out
from asyncgen.cli.exits import Exit
from asyncgen.job.prompts import available_templates, load_template

__all__ = ["add_command"]


def add_command(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``asyncgen prompts``."""
    sub.add_parser("prompts", help="list the shipped prompt templates").set_defaults(
        handler=_prompts
    )


def _prompts(args: argparse.Namespace) -> Exit:
    for name in available_templates():
        out(f"{name:18} {load_template(name).description}")
    return Exit.OK
