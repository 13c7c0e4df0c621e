"""The CLI in-process (main(argv)) and once through a real interpreter."""
import json
import subprocess
import sys

from fewstep.cli import main


def test_demo_quick_prints_the_table(capsys, tmp_path):
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "steps" in text and "SW2" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["steps"] for r in rows] == [1, 4, 25]
    assert rows[2]["sw2"] < rows[1]["sw2"] < rows[0]["sw2"]  # more teacher steps, closer to the data


def test_demo_refuses_to_overwrite(capsys, tmp_path):
    out = tmp_path / "demo.json"
    out.write_text("keep me")
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0]
    assert out.read_text() == "keep me"


def test_bad_input_is_one_line_and_exit_2(capsys):
    for argv, expected in [
        (["demo", "--solver", "rk4"], "valid: consistency, ddim, dpmpp_2m, euler, heun, renoise"),
        (["demo", "--mixture", "moons"], "valid: imbalanced_ring, random, ring"),
        (["demo", "--steps", "4,x"], "comma-separated integers"),
        (["demo", "--steps", "0"], ">= 1"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_entry_point_runs_in_a_real_interpreter():
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "demo", "--solver", "rk4"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "fewstep: error: unknown solver 'rk4'; valid: consistency, ddim, dpmpp_2m, euler, heun, renoise"
