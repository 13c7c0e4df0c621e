"""Fault injection: SIGKILL at random steps, then resume, ends bit-identical to an uninterrupted run (opt-in:
`pytest -m slow`, about four minutes on 2 cores). tests/test_loop.py covers SIGTERM and damaged checkpoints,
tests/commands/test_bad_input.py a full disk."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

RUN = [sys.executable, "-m", "fewstep", "distill", "gmm_teacher", "train.max_steps=3000", "train.checkpoint_every=25",
       "train.log_every=5", "train.progress=false", "train.sample_every=0"]


def _lines(path):
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.slow
def test_sigkill_at_ten_random_steps_then_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(RUN + [f"train.output_dir={ref}"], check=True, env=env, capture_output=True)
    rng = random.Random(0)
    kills = 0
    while kills < 10:
        log = out / "log.jsonl"
        before = _lines(log)
        p = subprocess.Popen(RUN + [f"train.output_dir={out}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and _lines(log) <= before:  # wait until this process is training
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if p.poll() is not None:
            break  # it finished first
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    assert kills == 10
    subprocess.run(RUN + [f"train.output_dir={out}"], check=True, env=env, capture_output=True)
    a = (ref / "final" / "mlp" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (out / "final" / "mlp" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b
    assert (out / "DONE").read_text() == (ref / "DONE").read_text()
