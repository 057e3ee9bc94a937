"""Persona selection and deduplication: ``asyncgen personas sample|filter|stats|dedup``.

Each command registers itself with ``add_commands`` and sets ``handler(args) -> exit status``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register this module's ``asyncgen personas`` subcommands."""
