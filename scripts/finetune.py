#!/usr/bin/env python
"""ORPO fine-tuning of a 4-bit base with LoRA: ``qlora-orpo train``. Flags: ``python scripts/finetune.py --help``."""

import sys

from qlora_orpo.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
