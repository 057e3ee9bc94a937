"""Exit statuses of every ``asyncgen`` command, named once.

* ``OK`` (0) — the command did all it was asked (every item of a job succeeded);
* ``FAILURES`` (1) — it finished, but some items failed or some input lines were bad
  (``bench``: no measured request succeeded);
* ``USAGE`` (2) — a usage, configuration, input, output-directory or endpoint error: one line
  on stderr names the cause and nothing is lost;
* ``INTERNAL`` (3) — a bug (the traceback is printed; committed results are safe);
* ``INTERRUPTED`` (130) — stopped by Ctrl-C or SIGTERM: rerun the same command to resume.
"""

from __future__ import annotations

import enum

__all__ = ["Exit"]


class Exit(enum.IntEnum):
    OK = 0
    FAILURES = 1
    USAGE = 2
    INTERNAL = 3
    INTERRUPTED = 130
