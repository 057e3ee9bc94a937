"""The ``asyncgen`` command line: a thin layer over the public API (see :mod:`.main`)."""

from asyncgen.cli.main import entry

__all__ = ["entry"]
