"""`python -m lib_sdtune ...`: the command line (see CLI.md)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
