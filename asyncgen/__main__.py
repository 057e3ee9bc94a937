import sys

from asyncgen.cli.main import entry

sys.exit(entry())
