"""`benchmarks/bench_step.py --pair tiny` runs end to end and writes the columns the README's tables are built from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {
    "case",
    "length",
    "step_s",
    "gen_s",
    "step_with_gen_s",
    "head_s",
    "head_fwd_s",
    "head_bwd_s",
    "stats_sel_s",
    "peak_mib",
    "step_s_vs_trl",
    "step_with_gen_s_vs_trl",
    "head_s_vs_trl",
    "peak_mib_vs_trl",
}
CASES = ["trl", "tip_all", "tip_soft_or_50", "tip_q3_10", "gkd"]


@pytest.mark.slow
def test_tiny_pair_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--pair", "tiny", "--device", "cpu"]
        + ["--repetitions", "1", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "bench_step_tiny.jsonl").read_text().splitlines()]
    runs = [r for r in rows if r["type"] == "run"]
    summaries = {r["case"]: r for r in rows if r["type"] == "summary"}
    assert sorted(r["case"] for r in runs) == sorted(CASES)
    assert list(summaries) == CASES
    for case, row in summaries.items():
        assert SUMMARY_KEYS <= set(row), SUMMARY_KEYS - set(row)
        assert not row["errors"], row["errors"]
        for key in ("step_s", "gen_s", "step_with_gen_s", "head_s", "head_fwd_s", "head_bwd_s", "peak_mib"):
            assert row[key] > 0, (case, key, row[key])
        assert row["head_s"] < row["step_s"], (case, row)
        assert (row["stats_sel_s"] is not None) == case.startswith("tip"), case
    assert summaries["trl"]["step_s_vs_trl"] == 1.0
    for run in runs:
        assert len(run["losses"]) == 2 and all(loss > 0 for loss in run["losses"]), run
    table = (tmp_path / "bench_step_tiny.md").read_text()
    assert "| case | step w/o gen (s) | vs TRL |" in table
    for case in CASES:
        assert f"| `{case}` |" in table
    assert "| `trl` |" in proc.stdout  # the table is printed too
