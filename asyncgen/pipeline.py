"""Persona creation as resumable jobs: ``asyncgen personas from-text`` and ``expand``.

Each command registers itself with ``add_commands`` and sets ``handler(args) -> exit status``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register this module's ``asyncgen personas`` subcommands."""
