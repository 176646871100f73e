"""Markdown tables of a `python -m ropekv bench` JSON, as in results/h100.md.

Usage: python benchmarks/tables.py results/h100.json [results/h100-pdl.json ...]
One table per file: µs per call of each variant, and the fused call's bandwidth.
"""
import json
import sys

VARIANTS = ("store_kv", "rope", "fused", "unfused", "torch")


def us(x):
    return "-" if x is None else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def table(path):
    with open(path) as f:
        run = json.load(f)
    empty = run.get("empty_kernel")  # absent before the bench timed it
    floor = f", empty kernel {empty['us']:.2f} µs" if empty else ""
    lines = [f"{path}: pdl={run['pdl']}, copy {2 * 2**30 / run['copy']['us'] / 1e3:.0f} GB/s{floor}", "",
             "| shape | cache | tokens | sets | " + " | ".join(VARIANTS) + " | fused GB/s | fused % of copy |",
             "| --- | --- | ---: | ---: | " + "---: | " * len(VARIANTS) + "---: | ---: |"]
    for r in run["results"]:
        v = r["variants"]
        cells = [us(v.get(name, {}).get("us")) for name in VARIANTS]
        fused = v.get("fused", {})
        bw = f"{fused['GBps']:.0f} | {fused['pct_copy']:.1f}%" if "GBps" in fused else "- | -"
        lines.append(f"| {r['shape']} | {r['cache']} | {r['tokens']} | {r.get('buffer_sets', 1)} | "
                     + " | ".join(cells) + f" | {bw} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(p) for p in sys.argv[1:]))
