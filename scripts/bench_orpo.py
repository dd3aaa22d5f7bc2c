"""Benchmark one ORPO optimizer step: TRL's loss path vs ours (joint, split); see qlora_orpo/bench/.

    python scripts/bench_orpo.py                       # 256..2048 tokens, TRL / joint / split
    python scripts/bench_orpo.py --allocators glibc,trim,jemalloc,mimalloc --lengths 512,2048
    python scripts/bench_orpo.py --quick               # tiny random model, lengths 32 and 64
"""

import sys
from pathlib import Path

from qlora_orpo.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], script=Path(__file__).resolve()))
