import sys

from asyncgen.cli import entry

sys.exit(entry())
