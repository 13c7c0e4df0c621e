"""benchmarks/gpu_rehearsal.py in its CPU mode (the tiny pipelines): every SD-family recipe, sd35_* included, runs
its stages; the precision check and the save/resume/export row report; the report is on disk row by row, so a
run killed half-way keeps what it finished. Slow (about 2 minutes on 2 cores): ``pytest -m slow``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fewstep.config import available_recipes
from fewstep.testing.recipes import FAMILY

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_rehearsal.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}

pytestmark = pytest.mark.slow


def test_cpu_mode_runs_every_sd_family_recipe_with_precision_and_save_resume_export(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--no-latency", "--guard", "300", "--budget", "3000",
                           "--out", str(out)], env=ENV,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["finished"] is True
    rows = report["rows"]
    sd = sorted(n for n in available_recipes() if n.startswith(tuple(FAMILY)))
    assert {r["recipe"] for r in rows} >= set(sd), set(sd) - {r["recipe"] for r in rows}
    assert any(r["recipe"].startswith("sd35_") and r["status"] == "ok" for r in rows)
    assert [r["status"] for r in rows if r["recipe"] == "sd15_lcm_lora@save_resume_export"] == ["ok"]
    assert [r["status"] for r in rows if r["recipe"] == "sd15_lcm@fsdp"] == ["ok"]
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith("not run: "), r
    by_dtype = {r["teacher_dtype"]: r for r in report["precision"]}
    assert by_dtype["bfloat16"]["passes"] and by_dtype["bfloat16"]["cosine"] > 0.99
    assert not by_dtype["float16"]["passes"] and by_dtype["float16"]["zeros"] > 0  # the tiny UNet shows it too


def test_a_run_killed_half_way_leaves_the_rows_it_finished(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--tiny", "--no-latency", "--out", str(out),
                             "--recipes", "sd15_lcm,sd15_lcm_lora,sd3_scm,sd35_lcm_lora"], env=ENV, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # until the save/resume/export row and one recipe's are written
            if out.exists() and len(json.loads(out.read_text())["rows"]) >= 2:
                break
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    report = json.loads(out.read_text())  # the atomic writes leave a whole file, never half of one
    assert report["finished"] is False
    assert 2 <= len(report["rows"]) < 5 and all(r["status"] == "ok" for r in report["rows"])
    assert report["precision"]
