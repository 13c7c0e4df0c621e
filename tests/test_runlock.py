"""One live run per output directory (fewstep/runlock.py): a second run on a live directory is refused in one line
naming the live one and changes nothing; a SIGKILLed run leaves no stuck lock (the next run resumes it); a
launch's own processes are not refused (tests/test_multiprocess.py runs two-process launches)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from fewstep.cli import main
from fewstep.runlock import LOCK_NAME

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def _snapshot(out):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != "log.jsonl" and "checkpoints" not in p.parts}


def test_a_second_run_on_a_live_directory_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "gmm_teacher", f"train.output_dir={out}", "train.progress=false", "train.max_steps=1000000",
            "train.checkpoint_every=5", "train.log_every=5"]
    live = subprocess.Popen([sys.executable, "-m", "fewstep", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints").is_dir() or not any((out / "checkpoints").iterdir()):
            assert live.poll() is None and time.monotonic() < deadline, "the live run did not start"
            time.sleep(0.2)
        before = _snapshot(out)
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{out.resolve()} is in use by a live run (pid {live.pid} on " in err[0], err
        assert {p: v for p, v in _snapshot(out).items() if p.name != "recipe.yaml"} == \
               {p: v for p, v in before.items() if p.name != "recipe.yaml"}
        assert _snapshot(out).get(out / "recipe.yaml") == before.get(out / "recipe.yaml")
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=60)
    assert (out / LOCK_NAME).exists()  # left behind, but no longer held
    assert main([*args[:-3], "train.max_steps=2", "train.checkpoint_every=1"]) in (0,)
    assert "in use by a live run" not in capsys.readouterr().err


def test_a_moved_run_directory_resumes(tmp_path, capsys):
    """A run directory moved (or copied) elsewhere resumes there; until 2026-12-08 its saved recipe's output_dir made
    it "a different recipe" (issue 42)."""
    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "moved"
    common = ["distill", "gmm_teacher", "train.progress=false", "train.checkpoint_every=2"]
    assert main([*common, f"train.output_dir={first}", "train.max_steps=2"]) == 0
    moved.parent.mkdir()
    first.rename(moved)
    capsys.readouterr()
    assert main([*common, f"train.output_dir={moved}", "train.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out and "finished at step 4" in out
