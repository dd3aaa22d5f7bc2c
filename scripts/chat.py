#!/usr/bin/env python
"""Chat with an adapter on its base, or with a model directory. Flags: ``python scripts/chat.py --help``."""

import sys

from qlora_orpo.chat import main

if __name__ == "__main__":
    sys.exit(main())
