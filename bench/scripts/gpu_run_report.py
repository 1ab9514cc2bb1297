"""Write what a (possibly budget-cut) ``bench/gpu_check.sh`` run has so far into bench/RESULTS.md.

    python bench/scripts/gpu_run_report.py OUT_DIR DEVICE [--results bench/RESULTS.md]

Merges every ``OUT_DIR/bench-*.json`` (one per benchmark stage) into ``OUT_DIR/bench.json``, renders it
with ``bench.scripts.report`` (ratios to F.linear and naive within each group of the same run), adds the
stage table (``OUT_DIR/stages.tsv``: stage, seconds, status) and the autotune picks when that stage ran,
and replaces the "GPU run" section of bench/RESULTS.md. Called after every stage, so a run cut by its
budget (or killed) still leaves the tables of the stages it finished.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from aot_sweep import write_results  # noqa: E402
from bench.scripts import report  # noqa: E402


def merged_benchmarks(out: str) -> dict:
    """The benchmarks of every stage's JSON in one pytest-benchmark document (machine info of the first)."""
    data: dict = {}
    for path in sorted(glob.glob(os.path.join(out, "bench-*.json"))):
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError):  # a stage killed while writing: its numbers are lost, not the others'
            continue
        if not data:
            data = {k: v for k, v in d.items() if k != "benchmarks"}
            data["benchmarks"] = []
        data["benchmarks"] += d.get("benchmarks", [])
    return data


def stage_table(out: str) -> str:
    path = os.path.join(out, "stages.tsv")
    if not os.path.exists(path):
        return ""
    lines = ["| stage | seconds | status |", "|---|---|---|"]
    with open(path) as f:
        for row in f:
            name, secs, status = (row.rstrip("\n").split("\t") + ["", ""])[:3]
            lines.append(f"| {name} | {secs} | {status} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="gpu_check.sh's output folder")
    ap.add_argument("device", help="the device line gpu_check.sh printed")
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS.md"), help="the file to rewrite")
    a = ap.parse_args(argv)
    out, device = a.out, a.device
    data = merged_benchmarks(out)
    body = ""
    if data.get("benchmarks"):
        with open(os.path.join(out, "bench.json"), "w") as f:
            json.dump(data, f)
        body = report.markdown(data, os.path.join(out, "bench.json"))
        try:
            report.plot(data, os.path.join(out, "report.png"))
        except Exception as e:  # the plot is a convenience; the tables are the record
            print(f"gpu_run_report: no plot ({e})", file=sys.stderr)
    else:
        body = "No benchmark stage finished."
    autotune = os.path.join(out, "autotune.md")
    if os.path.exists(autotune):
        body += "\n\n### Autotuned configs\n\n" + open(autotune).read()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    cap = os.environ.get("PMKERNELS_AUTOTUNE_CONFIGS", "") or "all"
    write_results(f"## GPU run, {datetime.date.today()}: {device}, commit {commit or '?'}\n\n"
                  f"`bash bench/gpu_check.sh` (measured; ratios in the same run; autotune configs per launch: "
                  f"{cap})\n\n"
                  f"{stage_table(out)}\n\n{body}", path=a.results,
                  begin="<!-- gpu-run:begin -->", end="<!-- gpu-run:end -->")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(body + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
