#!/usr/bin/env python
"""Chat with an adapter on its base, or with a model directory: ``qlora-orpo chat``. Flags: ``--help``."""

import sys

from qlora_orpo.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
