"""`python -m fewstep.testing.tryout RECIPE`: a shipped SD recipe on a CPU at toy sizes, on the tiny pipeline of its
family, end to end (issue 42: sd15_lcm_lora on the tiny fixture had kept 512 px, batch 12 and bf16 and not finished
a step in 14 minutes)."""
from __future__ import annotations

import time

from fewstep.testing.tryout import main


def test_a_recipe_with_prompt_pairs_and_stages_runs_on_a_cpu_in_seconds(tmp_path, capsys):
    start = time.monotonic()
    assert main(["sd3_reflow", str(tmp_path)]) == 0  # pairs from prompts, reflow, pairs again, distill
    assert (tmp_path / "sd3_reflow" / "final" / "fewstep.json").exists()
    assert time.monotonic() - start < 120
    assert "finished at step 2" in capsys.readouterr().out
    assert main(["gmm_cd", str(tmp_path)]) == 2
    assert "gmm_cd is not an SD-family recipe; valid: flux_dmd," in capsys.readouterr().err
