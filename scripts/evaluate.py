"""``qlora-orpo eval``: held-out reward accuracy, log-odds ratio, reward margin and chosen NLL: base vs base + adapter.

    python scripts/evaluate.py --adapter runs/<name>/adapter            # settings from the adapter's card
    python scripts/evaluate.py --model embedded --max-pairs 32          # the base alone
    python scripts/evaluate.py --adapter runs/<name>/adapter --json eval.json
"""

import sys

from qlora_orpo.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
