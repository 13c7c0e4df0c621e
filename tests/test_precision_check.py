"""benchmarks/precision.py on the tiny SD UNet (seconds; the SD 1.5-sized figures are in docs/benchmarks.md): the
gradient a trained term sends through the frozen teacher, against the same computation in float32. It fails a
float16 teacher on f-distill's GAN path (sd15_fdistill_js as it was until 2026-12-08) and passes the shipped
bfloat16 one."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from fewstep.config import find_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import precision  # noqa: E402


def test_the_check_fails_a_float16_teacher_on_the_gan_path_and_passes_bfloat16(tmp_path, capsys):
    raw = yaml.safe_load(find_recipe("sd15_fdistill_js").read_text())
    assert raw["train"]["teacher_dtype"] == "bfloat16"
    raw["train"]["teacher_dtype"] = "float16"  # the recipe until 2026-12-08
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(raw))
    assert precision.main(["--tiny", "--recipe", str(old), "--batch", "4", "--out", str(tmp_path / "old.json")]) == 1
    assert precision.main(["--tiny", "--recipe", "sd15_fdistill_js", "--batch", "4",
                           "--out", str(tmp_path / "new.json")]) == 0
    import json

    rows = {(r["path"], r["teacher_dtype"]): r for r in json.loads((tmp_path / "new.json").read_text())["rows"]}
    assert rows[("gan", "float32")]["cosine"] > 0.9999 and rows[("gan", "float32")]["zeros"] == 0
    assert rows[("gan", "bfloat16")]["cosine"] >= 0.99 and rows[("gan", "bfloat16")]["zeros"] == 0
    assert rows[("gan", "float16")]["cosine"] < 0.99 and rows[("gan", "float16")]["mid_zeros"] > 0.05
    # the LoRA fake score's own loss is large: its adapters' gradient survives either half precision
    assert rows[("teacher_lora", "float16")]["passes"] and rows[("teacher_lora", "bfloat16")]["passes"]
