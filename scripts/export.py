#!/usr/bin/env python
"""Merge an adapter into its unquantised base and verify it. Flags: ``python scripts/export.py --help``."""

import sys

from qlora_orpo.export import main

if __name__ == "__main__":
    sys.exit(main())
