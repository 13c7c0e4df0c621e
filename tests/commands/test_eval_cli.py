"""`fewstep eval`, the latency harness and `fewstep bench`."""
import json
import time

import pytest
import torch

from fewstep.cli import main
from fewstep.config import validate
from fewstep.data.digits import load_digits_tensors
from fewstep.eval.latency import PARTS, measure
from fewstep.io import partial_siblings, save_safetensors_atomic
from fewstep.run import run_recipe

from tests.test_loop import digits_recipe


def test_eval_of_real_digits_against_the_digits_reference(tmp_path, capsys):
    x, _ = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    real = tmp_path / "real.safetensors"
    noise = tmp_path / "noise.safetensors"
    save_safetensors_atomic({"samples": x[perm[:600]]}, real)
    save_safetensors_atomic({"samples": torch.rand(600, 1, 8, 8) * 2 - 1}, noise)
    out = tmp_path / "m.json"
    assert main(["eval", "--samples", str(real), "--reference", "digits", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    capsys.readouterr()
    assert m["n_samples"] == 600 and m["n_reference"] == 1797 and "digits feature network" in m["features"]
    assert main(["eval", "--samples", str(noise), "--reference", "digits"]) == 0
    printed = capsys.readouterr()
    m_noise = json.loads(printed.out)
    assert "note: 600 samples; a Frechet distance from fewer than 10,000 is biased upward" in printed.err  # issue 42
    assert m["fd"] < 0.05 * m_noise["fd"] and m["precision"] > m_noise["precision"]
    assert main(["eval", "--samples", str(real), "--reference", "digits", "--out", str(out)]) == 2  # never overwritten
    assert main(["eval", "--samples", str(real), "--reference", "digits", "--features", "clip"]) == 2
    assert "valid: digits, inception, dinov2" in capsys.readouterr().err


def test_latency_harness_excludes_warmup_and_parts_sum_to_the_whole():
    calls = {"n": 0}

    def run(timer):
        calls["n"] += 1
        slow = 0.05 if calls["n"] <= 2 else 0.0  # warm-up runs are slow; they must not be counted
        with timer.part("text_encoder"):
            time.sleep(0.002 + slow)
        with timer.part("denoiser"):
            time.sleep(0.010)
        with timer.part("vae_decode"):
            time.sleep(0.004)

    r = measure(run, warmup=2, repeats=9)
    assert calls["n"] == 11
    assert r["median_s"] < 0.03  # no warm-up in the statistics
    parts = sum(r[f"{p}_s"] for p in PARTS)
    assert abs(parts - r["median_s"]) <= 0.05 * r["median_s"]


def test_bench_writes_report_table_and_plot(tmp_path, capsys):
    model = tmp_path / "teacher"
    run_recipe(validate(digits_recipe(model, max_steps=2)), log=lambda m: None)
    out = tmp_path / "bench"
    assert main(["bench", "--teacher", str(model / "final"), "--teacher-steps", "1,2", "--student",
                 f"copy={model / 'final'}@1", "--num", "40", "--repeats", "2", "--warmup", "1",
                 "--throughput-batch", "4", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(r["model"], r["steps"]) for r in report["rows"]] == [("teacher", 1), ("teacher", 2), ("copy", 1)]
    assert all(r["fd"] > 0 and r["median_s"] > 0 for r in report["rows"])
    assert "| teacher | 2 |" in (out / "report.md").read_text()
    assert (out / "pareto.png").stat().st_size > 1000
    assert main(["bench", "--teacher", str(model / "final"), "--out", str(out)]) == 2  # not empty: refused
    assert main(["bench", "--teacher", "x", "--student", "nodir", "--out", str(tmp_path / "b2")]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


def test_the_loop_evaluates_logs_and_keeps_the_best(tmp_path):
    raw = digits_recipe(tmp_path / "ev", max_steps=4, eval_every=2)
    raw["evaluation"] = {"num": 40, "steps": 2}
    assert run_recipe(validate(raw), log=lambda m: None).status == "finished"
    rows = [json.loads(x) for x in (tmp_path / "ev/log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("eval")]
    assert [r["step"] for r in evals] == [2, 4] and all(r["fd"] > 0 and r["n_samples"] == 40 for r in evals)
    assert evals[0].get("best") and (tmp_path / "ev/best/fewstep.json").exists()
    best = min(r["fd"] for r in evals)
    from fewstep.checkpoint import checkpoint_dirs

    state = json.loads((checkpoint_dirs(tmp_path / "ev/checkpoints")[-1] / "state.json").read_text())
    assert state["state"]["best"] == best  # resume keeps the best value
    raw["evaluation"]["features"] = "clip"
    assert main(["validate", "gmm_teacher", "evaluation.features=clip"]) == 2


def test_a_failed_bench_leaves_no_report_and_the_rerun_succeeds(tmp_path, monkeypatch):
    """A run that fails after report.json is written (here: in the Pareto plot) leaves neither the report
    directory nor its temporary sibling; a sibling left by a killed run is cleared; the rerun just works."""
    import fewstep.commands.bench as bench

    model = tmp_path / "teacher"
    run_recipe(validate(digits_recipe(model, max_steps=2)), log=lambda m: None)
    out = tmp_path / "bench"
    argv = ["bench", "--teacher", str(model / "final"), "--teacher-steps", "1", "--num", "20", "--repeats", "1",
            "--warmup", "0", "--throughput-batch", "2", "--out", str(out)]
    written = []

    def failing_plot(rows, path):
        written.extend(sorted(p.name for p in path.parent.iterdir()))
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(bench, "pareto_plot", failing_plot)
    with pytest.raises(RuntimeError, match="the plot failed"):
        main(argv)
    assert written == ["report.json", "report.md"]  # it failed after report.json was written
    assert not out.exists() and partial_siblings(out) == [] and list(tmp_path.iterdir()) == [model]
    monkeypatch.undo()
    (tmp_path / ".bench.partial-killed").mkdir()  # what a SIGKILLed run leaves
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "report.json", "report.md"]
    assert partial_siblings(out) == []


def test_bench_times_the_exported_pipeline_called_plainly(tmp_path, tiny_dirs, captioned_dir, monkeypatch):
    """A pipeline student's bench report gains the deployed rows: the exported pipeline called as its model card
    says, `pipe(prompts, num_inference_steps=k, guidance_scale=...)`, at batch 1 and 2, beside fewstep's sampler.
    The pipeline's own __call__ is counted (wrapped here, in the test): warm-up + repeats per batch and step count,
    each with num_inference_steps=k and the batch's prompts."""
    import diffusers

    from fewstep.run import build_loop
    from tests.test_lora import _recipe

    assert build_loop(_recipe(tmp_path, tiny_dirs["sd"], captioned_dir, "consistency"), log=lambda m: None).run().status \
        == "finished"
    final = tmp_path / "run" / "final"
    calls = []
    original = diffusers.StableDiffusionPipeline.__call__

    def counted(self, prompt=None, **kwargs):
        calls.append((len(prompt), kwargs.get("num_inference_steps"), kwargs.get("guidance_scale")))
        return original(self, prompt, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "__call__", counted)
    out = tmp_path / "bench"
    assert main(["bench", "--teacher", str(final), "--teacher-steps", "1", "--student", f"lcm={final}@2",
                 "--num", "4", "--repeats", "1", "--warmup", "1", "--throughput-batch", "2", "--deploy-batches", "1,2",
                 "--features", "inception", "--reference", str(captioned_dir), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = [(d["model"], d["steps"], d["batch"]) for d in report["deployed"]]
    assert rows == [("teacher", 1, 1), ("teacher", 1, 2), ("lcm", 2, 1), ("lcm", 2, 2)]
    assert all(d["pipeline_median_s"] > 0 and d["fewstep_median_s"] > 0 for d in report["deployed"])
    expected = [(b, k, 1.0) for k in (1, 2) for b in (1, 2) for _ in range(1 + 1)]  # warm-up 1 + repeats 1
    assert sorted(calls) == sorted(expected)
    assert "## Deployed: the exported diffusers pipeline, called plainly" in (out / "report.md").read_text()


def test_bench_arguments_for_in_process_callers_are_the_commands_defaults():
    """The demo and benchmarks/digits_scm.py run bench in-process: their arguments come from the command's own parser
    (an option added to `fewstep bench` reaches them with its default; the digits benchmark once broke on a missing
    deploy_batches), the given values in place, and a misspelt name is refused with the valid ones."""
    import argparse

    from fewstep.commands.bench import add_parser, bench_arguments

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    cli = parser.parse_args(["bench", "--teacher", "T", "--out", "O", "--num", "7"])
    ours = bench_arguments(teacher="T", out="O", num=7)
    assert vars(ours) == vars(cli) and ours.deploy_batches == "1,8"
    with pytest.raises(ValueError, match=r"unknown bench arguments \['nmu'\]; valid: .*'num'"):
        bench_arguments(nmu=7)


def test_bench_takes_a_plain_diffusers_pipeline_as_the_teacher(tmp_path, tiny_dirs, captioned_dir):
    """The SD teacher users distill from is a plain diffusers pipeline (no fewstep.json): bench measures it at each
    step count and times its own pipeline call (with its own scheduler, named in the row) beside fewstep's sampler."""
    out = tmp_path / "bench"
    assert main(["bench", "--teacher", str(tiny_dirs["sd"]), "--teacher-steps", "1,2", "--num", "4", "--repeats", "1",
                 "--warmup", "1", "--throughput-batch", "2", "--deploy-batches", "1", "--features", "inception",
                 "--reference", str(captioned_dir), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    own = json.loads((tiny_dirs["sd"] / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    assert [(r["model"], r["steps"]) for r in report["rows"]] == [("teacher", 1), ("teacher", 2)]
    assert all(r["fd"] > 0 and r["median_s"] > 0 for r in report["rows"])
    assert [(d["steps"], d["call"], d["scheduler"]) for d in report["deployed"]] == \
        [(k, {"guidance_scale": 7.5, "num_inference_steps": k}, own) for k in (1, 2)]
