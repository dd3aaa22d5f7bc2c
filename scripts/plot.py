"""Redraw a run's training curves (``qlora-orpo plot``): ``python scripts/plot.py runs/<name>`` writes runs/<name>/curves.png."""

import sys

from qlora_orpo.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
