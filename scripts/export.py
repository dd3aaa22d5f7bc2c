#!/usr/bin/env python
"""Merge an adapter into its unquantised base and verify it: ``qlora-orpo export``. Flags: ``--help``."""

import sys

from qlora_orpo.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
