"""bench/gpu_check.sh's budget handling and its report writer (no GPU needed for these parts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
REPORT = os.path.join(ROOT, "bench", "scripts", "gpu_run_report.py")


def _run(*args, cwd=ROOT):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # never use a GPU here, even where one exists
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize("args,msg", [(["--budget", "x"], "--budget needs a number"),
                                      (["--budget"], "--budget needs a number"),
                                      (["--bogus"], "unknown option")])
def test_bad_arguments_are_one_line_and_status_2(args, msg):
    p = _run(*args)
    assert p.returncode == 2
    assert msg in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_spent_budget_starts_no_stage(tmp_path):
    # without a GPU only the compile subset would run; a zero budget records it as not started, fast
    out = tmp_path / "out"
    p = _run("--budget", "0", str(out))
    assert p.returncode == 2 and "no CUDA device" in p.stderr
    assert (out / "stages.tsv").read_text() == "aot-subset\t-\tnot started (budget spent)\n"


def _bench_doc(impl_medians: dict, pass_="fwd") -> dict:
    group = f"decode 16tok 128->128 | bf16 | {pass_} | gamma=shared"
    return {"machine_info": {"node": "test"}, "commit_info": {}, "datetime": "2026-01-01T00:00:00",
            "version": "5", "benchmarks": [
                {"group": group, "name": f"test[{impl}]", "param": impl, "stats": {"median": m},
                 "extra_info": {"impl": impl, "pass": pass_, "shape": "decode", "tokens": 16, "d_in": 128,
                                "d_out": 128, "dtype": "bf16", "gamma": "shared"}}
                for impl, m in impl_medians.items()]}


def test_report_merges_stages_and_survives_a_cut_stage(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench-1-fwd.json").write_text(json.dumps(_bench_doc({"linear": 1e-5, "naive": 4e-5, "triton": 1.2e-5})))
    (out / "bench-2-fwdbwd.json").write_text(json.dumps(_bench_doc({"linear": 2e-5, "triton": 3e-5}, "fwdbwd-frozenW")))
    (out / "bench-3-op-rest.json").write_text('{"benchmarks": [')  # killed while writing
    (out / "stages.tsv").write_text("cuda-tests\t40\tok\nfwd\t90\tok\nfwdbwd\t120\tok\n"
                                    "op-rest\t300\tcut at the budget\n")
    results = tmp_path / "RESULTS.md"
    results.write_text("# R\n<!-- gpu-run:begin -->\nold\n<!-- gpu-run:end -->\nkept\n")
    p = subprocess.run([sys.executable, REPORT, str(out), "H100 test", "--results", str(results)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    text = results.read_text()
    assert "old" not in text and text.endswith("kept\n") and "H100 test" in text
    assert "| op-rest | 300 | cut at the budget |" in text
    assert "1.20×" in text and "1.50×" in text  # triton / linear in the fwd and the fwd+bwd group
    assert len(json.loads((out / "bench.json").read_text())["benchmarks"]) == 5
