"""Prompt sets without images (fewstep/data/prompts.py) and the refusal of a long run on a handful of prompts
(fewstep.build.data.check_prompt_count): every reader against the prompts written, in order."""
from __future__ import annotations

import json

import pytest

from fewstep.build.data import _prompts, check_prompt_count
from fewstep.cli import main
from fewstep.data.prompts import PromptDataset, hf_prompts, load_prompts
from fewstep.errors import FewstepError

WRITTEN = ["a red circle", "two, small \"green\" triangles", "a cat on a mat", "a cat on a mat"]


def test_tabular_files_give_their_text_column_in_order(tmp_path):
    import csv

    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        w.writerows([[i, t] for i, t in enumerate(WRITTEN)] + [[9, "  "]])
    (tmp_path / "p.tsv").write_text("text\tscore\n" + "".join(f"{t}\t1\n" for t in WRITTEN))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t, "n": 1}) + "\n" for t in WRITTEN) + "\n")
    (tmp_path / "p.json").write_text(json.dumps(WRITTEN))
    (tmp_path / "r.json").write_text(json.dumps([{"TEXT": t} for t in WRITTEN] + [{"TEXT": None}]))
    for name in ("p.csv", "p.tsv", "p.jsonl", "p.json", "r.json"):
        assert load_prompts(tmp_path / name) == WRITTEN, name
    assert load_prompts(tmp_path / "p.csv", column="id") == ["0", "1", "2", "3", "9"]
    with pytest.raises(FewstepError, match="has no column 'txt'; valid: id, caption"):
        load_prompts(tmp_path / "p.csv", column="txt")
    (tmp_path / "q.jsonl").write_text(json.dumps({"url": "x"}) + "\n")
    with pytest.raises(FewstepError, match="none of the text columns .*data.column, valid: url"):
        load_prompts(tmp_path / "q.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(FewstepError, match="not valid JSON Lines \\(line 2"):
        load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(FewstepError, match="data.column 'text' is for tabular prompt files"):
        load_prompts(_txt(tmp_path), column="text")


def _txt(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("\n".join(WRITTEN))
    return p


def test_parquet_and_a_hugging_face_dataset_give_their_text_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"Prompt": WRITTEN, "Category": ["a"] * len(WRITTEN)})
    ds.to_parquet(str(tmp_path / "p.parquet"))
    assert load_prompts(tmp_path / "p.parquet") == WRITTEN
    ds.save_to_disk(str(tmp_path / "saved"))
    assert hf_prompts(str(tmp_path / "saved")) == WRITTEN
    assert hf_prompts(str(tmp_path / "saved"), column="Category") == ["a"] * len(WRITTEN)
    with pytest.raises(FewstepError, match="has no column 'text'; valid: Prompt, Category"):
        hf_prompts(str(tmp_path / "saved"), column="text")
    # the recipe's section: data.dataset, data.column
    assert _prompts(dataset=str(tmp_path / "saved"), column="Prompt").prompts == WRITTEN
    with pytest.raises(FewstepError, match="not both"):
        _prompts(path=str(tmp_path / "p.parquet"), dataset=str(tmp_path / "saved"))


def test_a_long_run_on_few_prompts_is_refused_and_a_short_one_is_not():
    few = PromptDataset(WRITTEN, min_prompts=100)
    check_prompt_count(few, 100, "pairs.num")  # draws no more than min_prompts: a smoke or trial run
    with pytest.raises(FewstepError, match=r"^3 distinct prompts for a run that draws 101 \(pairs.num\); this recipe "
                                           r"needs at least 100 \(data.min_prompts\)"):
        check_prompt_count(few, 101, "pairs.num")
    check_prompt_count(PromptDataset([str(i) for i in range(100)], min_prompts=100), 10**6, "x")
    check_prompt_count(PromptDataset(WRITTEN), 10**6, "x")  # min_prompts 0: any number


def test_sd15_dmd_refuses_its_full_run_on_the_built_in_prompts_before_loading_a_model(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["distill", "sd15_dmd", f"teacher.path={tiny_dirs['sd']}", f"train.output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].endswith("40 distinct prompts for a run that draws 343,200 (train.max_steps x train.batch_size x "
                           "train.grad_accum); this recipe needs at least 10,000 (data.min_prompts): give data.path=FILE "
                           "(one prompt a line, or a .csv/.jsonl/.parquet text column) or data.dataset=HUB_ID (a caption "
                           "set, docs/data.md 'Prompt sets'), or draw at most 10,000, or set data.min_prompts=0 to train "
                           "on these anyway"), err
    assert not out.exists()


@pytest.mark.parametrize("name,line", [
    ("sd15_dmd", "  prompts: refused: 40 distinct prompts for a run that draws 343,200"),
    ("sd15_instaflow", "  prompts: refused: 40 distinct prompts for a run that draws 100,000 (pairs.num)"),
    ("sd3_reflow", "  prompts: refused: 40 distinct prompts for a run that draws 100,000 (pairs.num)"),
])
def test_dry_run_states_the_prompt_refusal_and_the_batch(name, line, capsys):
    assert main(["distill", name, "--dry-run", "--num-processes", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(ln.startswith(line) for ln in out), out
    assert any(ln.startswith("  batch: ") and "per process" in ln for ln in out)
