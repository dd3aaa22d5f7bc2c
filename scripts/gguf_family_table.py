"""The README's per-family GGUF table: each tiny family of the test suite, every quant, judged by llama.cpp.

    python scripts/gguf_family_table.py [--out docs/gguf_families.json]

Builds the suite's tiny random models (tests/gguf_family_cases.py, tests/test_gguf_llamacpp.py:
each family with its own tokenizer type and chat template, a LoRA adapter on every linear
layer), exports each to every ``--quant`` through ``export_gguf`` (which verifies every file:
llama.cpp when llama-cpp-python is installed, else transformers' reader), and prints a
markdown table with the file size, export time and the judge's figures. The models are tiny
(hidden 64), so the times are dominated by fixed costs and the 4-6 bit mixes mostly fall back.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(TESTS))  # the suite's builders of tiny families are the table's subjects
    from gguf_family_cases import FAMILIES, make_case
    from test_gguf_llamacpp import ARCHS, build_case

    from qlora_orpo.export import gguf as G

    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-table-") as tmp:
        for name in (*ARCHS, *FAMILIES):
            root = Path(tmp) / name
            root.mkdir()
            case = build_case(root, name) if name in ARCHS else make_case(root, name)
            for quant in G.QUANTS:
                start = time.perf_counter()
                try:
                    result = G.export_gguf(case["adapter"], root / quant, quant)
                except Exception as exc:  # a row that says why, not a crashed table
                    rows.append({"family": name, "quant": quant, "error": str(exc).splitlines()[0][:160]})
                    continue
                check = result.check
                rows.append({"family": name, "quant": quant, "bytes": result.bytes,
                             "seconds": time.perf_counter() - start, "judge": check.judge,
                             "max_abs_diff": check.max_abs_diff, "tolerance": check.tolerance,
                             "top1": check.top1_agreement, "greedy": f"{check.greedy_identical}/{check.greedy_runs}"})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = ["| family | quant | file | export s | judge | max logit diff (tolerance) | top-1 | greedy |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['quant']} | error: {r['error']} | | | | | |")
            continue
        judge = "llama.cpp" if r["judge"].startswith("llama.cpp") else r["judge"]
        lines.append(f"| {r['family']} | {r['quant']} | {r['bytes'] / 1024:.0f} KiB | {r['seconds']:.1f} | {judge} | "
                     f"{r['max_abs_diff']:.2g} ({r['tolerance']:.2g}) | {r['top1']:.2f} | {r['greedy']} |")
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
