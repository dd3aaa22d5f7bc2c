#!/usr/bin/env python
"""Merge an adapter into its unquantised base (safetensors directory or GGUF) and verify it. Flags: ``--help``."""

import sys

from qlora_orpo.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
