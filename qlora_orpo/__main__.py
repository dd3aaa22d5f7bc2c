"""``python -m qlora_orpo COMMAND``: the same as the ``qlora-orpo`` console script."""

import sys

from qlora_orpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
