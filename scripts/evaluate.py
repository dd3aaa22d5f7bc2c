"""Base vs base + adapter on every held-out pair (with intervals) and generation health on held-out prompts.

    python scripts/evaluate.py --adapter runs/<name>/adapter            # settings from the adapter's card
    python scripts/evaluate.py --model embedded --max-pairs 32          # the base alone
    python scripts/evaluate.py --adapter runs/<name>/adapter --json eval.json --markdown eval.md
    python scripts/evaluate.py --adapter runs/<name>/adapter --health-prompts 40 --max-new-tokens 256
"""

import sys

from qlora_orpo.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
