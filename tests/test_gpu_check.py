"""benchmarks/gpu.py --smoke: the prepared GPU check runs every stage's code on the CPU, so it still works on
the day a GPU is at hand."""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
COLUMNS = ["stage", "what", "figure", "unit", "notes"]
STAGES = ["shards", "fit", "objective", "encode", "decode", "eval", "prior", "search", "agreement", "multi"]


def test_smoke_runs_every_stage_and_writes_the_table(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "gpu-check.json").read_text())
    assert report["smoke"] is True and report["columns"] == COLUMNS
    rows = report["rows"]
    assert all(list(row) == COLUMNS for row in rows)
    assert not [row for row in rows if "FAILED" in row["what"]]
    measured = [row for row in rows if row["figure"] is not None]
    assert all(math.isfinite(row["figure"]) and row["figure"] >= 0 and row["unit"] for row in measured)
    # every stage ran and gave at least one figure, in the order the table lists them
    assert list(dict.fromkeys(row["stage"] for row in measured)) == STAGES
    assert list(report["stage_seconds"]) == STAGES

    fits = [row["what"] for row in measured if row["stage"] == "fit" and row["unit"] == "images/s"]
    assert any(w.startswith("VQ-VAE") for w in fits) and any(w.startswith("VQGAN") for w in fits)
    objective = [row["notes"] for row in measured if row["stage"] == "objective" and row["unit"] == "images/s"]
    assert len(objective) == 1 and "x the pixel loss alone" in objective[0]
    agreement = [row for row in measured if row["stage"] == "agreement"]
    assert all(0 <= row["figure"] <= 100 for row in agreement)
    multi = [row["notes"] for row in measured if row["stage"] == "multi"]
    assert multi and all(note.startswith("2 processes") for note in multi)  # both ranks really ran

    # the printed table: its header, then a line per row
    header = next(line for line in proc.stdout.splitlines() if line.startswith("stage"))
    assert header.split()[:4] == COLUMNS[:4] and header.split()[-1] == "notes"
    printed = proc.stdout[proc.stdout.rindex(header) :].splitlines()[2:]
    assert [line.split()[0] for line in printed if line.strip()] == [row["stage"] for row in rows]
