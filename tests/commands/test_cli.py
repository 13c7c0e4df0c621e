"""The CLI in-process (main(argv)) and once through a real interpreter."""
import json
import subprocess
import sys

from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep.io import partial_siblings


def test_demo_quick_distills_three_ways_and_reports(capsys, tmp_path, monkeypatch):
    """The embedded default end to end at --quick size: three students, the bench report, grids. A run that
    fails at its last step leaves no report (nor a temporary sibling) and the rerun succeeds; a run after
    a complete one refuses to overwrite the report."""
    import fewstep.commands.demo as demo

    out = tmp_path / "demo"
    # smaller than --quick: what is asserted (the rows, teacher 25 steps closer to the data than 1, the files, the
    # refusals) does not need its length; the whole demo runs in CI's first command
    monkeypatch.setattr(demo, "QUICK", {**demo.QUICK, "updates": 4, "num": 64, "pairs": 64, "repeats": 1})

    def failing_verdict(report):  # the demo's last step, after report.json, the plot and the grids
        assert {"report.json", "pareto.png", "teacher_1step.png"} <= {p.name for p in report.iterdir()}
        raise FewstepError("the verdict failed")

    with monkeypatch.context() as patch:
        patch.setattr(demo, "verdict", failing_verdict)
        assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "the verdict failed" in capsys.readouterr().err
    assert not (out / "report").exists() and partial_siblings(out / "report") == []
    # the rerun resumes the finished students and writes the whole report
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = json.loads((out / "report" / "report.json").read_text())["rows"]
    students = ("reflow", "consistency", "fdistill_js")
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher", k) for k in (1, 2, 4, 8, 25)] + [
        (m, k) for m in students for k in (1, 2, 4)]
    fd = {(r["model"], r["steps"]): r["fd"] for r in rows}
    assert fd[("teacher", 25)] < fd[("teacher", 1)]  # more teacher steps, closer to the data
    for name in ("pareto.png", "report.md", "teacher_25steps.png", *(f"{m}_1step.png" for m in students)):
        assert (out / "report" / name).is_file(), name
    assert "| teacher | 25 |" in text and "best one-step student" in text
    before = (out / "report" / "report.json").read_bytes()
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a report" in err[0]
    assert (out / "report" / "report.json").read_bytes() == before


def test_bad_input_is_one_line_and_exit_2(capsys):
    for argv, expected in [
        (["demo", "--updates", "0"], "--updates must be >= 1"),
        (["sample", "--model", "/nonexistent", "--num", "2", "--out", "x.png"], "not a fewstep model directory"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_entry_point_runs_in_a_real_interpreter():
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "sample", "--model", "/nonexistent", "--num", "2", "--out", "x.png",
                        "--solver", "rk4"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("fewstep: error: /nonexistent is not a fewstep model directory")


def test_the_demo_verdict_says_which_way_a_distance_goes(tmp_path):
    """A student 10x worse than the teacher's one step reads "higher", not "0.1x lower" (issue 42)."""
    import json

    from fewstep.commands.demo import compared, verdict

    assert compared(58.81, 405.86) == "6.9x lower than" and compared(4331.68, 405.86) == "10.7x higher than"
    assert compared(5.0, 5.0) == "the same as"
    rows = [{"model": "teacher", "steps": 1, "fd": 405.86}, {"model": "teacher", "steps": 25, "fd": 10.0},
            {"model": "reflow", "steps": 1, "fd": 4331.68}]
    (tmp_path / "report.json").write_text(json.dumps({"rows": rows}))
    assert verdict(tmp_path)[0] == "reflow: one-step FD 4331.68 = 10.7x higher than the teacher's one step (405.86)"
