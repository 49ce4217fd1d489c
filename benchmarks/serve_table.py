"""Issue 6's serving table from serve_side_by_side.sh's JSON files, as RESULTS.md records it.

    python benchmarks/serve_table.py OUTPUT_DIR

One row per server (`OUTPUT_DIR/<server>.json`, written by `serve.py --json`): output tok/s at each
concurrency, c=1 TPOT p50, c=16 TTFT p50, ready time and peak RSS; then each tokenmill row's ratios to
vLLM (throughput, TTFT) and to llama-server (TPOT), where those rows exist.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ["server", "c=1 out tok/s", "c=1 TPOT", "c=16 out tok/s", "c=16 TTFT p50", "c=64 out tok/s",
           "ready after", "peak RSS", "failed"]  # fmt: skip


def level(report: dict[str, Any], concurrency: int) -> dict[str, Any]:
    return next((x for x in report["levels"] if x["concurrency"] == concurrency), {})


def row(name: str, report: dict[str, Any]) -> str:
    c1, c16, c64 = (level(report, c) for c in (1, 16, 64))
    failed = sum(x["num_failed"] for x in report["levels"])
    cells = [
        name,
        f"{c1.get('output_tok_s', 0):.1f}",
        f"{c1.get('tpot_ms', {}).get('p50', 0):.1f} ms",
        f"{c16.get('output_tok_s', 0):.1f}",
        f"{c16.get('ttft_ms', {}).get('p50', 0) / 1000:.2f} s",
        f"{c64.get('output_tok_s', 0):.1f}",
        f"{report.get('ready_s', 0):.1f} s",
        f"{report.get('peak_rss_bytes', 0) / 1e9:.2f} GB",
        str(failed),
    ]
    return "| " + " | ".join(cells) + " |"


def ratios(name: str, ours: dict[str, Any], reports: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    if "vllm" in reports:
        vllm = reports["vllm"]
        for c in (16, 64):
            mine, theirs = level(ours, c).get("output_tok_s", 0), level(vllm, c).get("output_tok_s", 0)
            if theirs:
                lines.append(f"{name}: c={c} output tok/s {mine / theirs:.2f}x vLLM's (goal 1.5x)")
        mine, theirs = (level(r, 16).get("ttft_ms", {}).get("p50", 0) for r in (ours, vllm))
        if theirs:
            lines.append(f"{name}: c=16 TTFT p50 {mine / theirs:.2f}x vLLM's (goal <= 1)")
    if "llama-server" in reports:
        mine, theirs = (level(r, 1).get("tpot_ms", {}).get("p50", 0) for r in (ours, reports["llama-server"]))
        if theirs:
            lines.append(f"{name}: c=1 TPOT p50 {mine / theirs:.2f}x llama-server's (goal <= 1)")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    reports = {path.stem: json.loads(path.read_text()) for path in sorted(Path(argv[0]).glob("*.json"))}
    if not reports:
        print(f"serve_table.py: no <server>.json in {argv[0]}", file=sys.stderr)
        return 1
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---" * len(COLUMNS) + "|")
    for name, report in reports.items():
        print(row(name, report))
    for name, report in reports.items():
        if name.startswith("tokenmill"):
            print("\n".join(ratios(name, report, reports)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
