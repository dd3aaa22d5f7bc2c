"""The argument parser of every command: a bad flag is one ``error: …`` line and exit code 2.

argparse's own ``error`` prints the whole usage first (about 45 lines for ``train``), which
buries the one line that says what is wrong; every other user error of the package is one
line (``core/errors.command``), so a flag error is too. ``--help`` still prints the usage.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line naming the flag; its subparsers are too."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)
