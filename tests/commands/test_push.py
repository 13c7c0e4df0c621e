"""`fewstep push` against a stubbed ``HfApi`` (tests never reach the network): the exact files it would upload, and
a model card whose metadata header the Hub reads and whose diffusers lines load the model."""
from __future__ import annotations

import json

import pytest
import yaml

from fewstep.cli import main
from tests.test_recipes import smoke_args


def _stub(monkeypatch):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.setdefault("repo", (repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit",
                        lambda self, repo_id, operations, **kw: calls.setdefault("commit", (repo_id, operations, kw)))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def _card(ops):
    text = next(op.path_or_fileobj for op in ops if op.path_in_repo == "README.md").decode()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


@pytest.mark.slow  # two smoke runs: about 30 s
def test_push_uploads_every_file_of_a_lora_final_with_a_hub_card(tmp_path, tiny_dirs, captioned_dir, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(smoke_args("sd15_lcm_lora", out, tiny_dirs, captioned_dir)) == 0
    final = out / "final"
    calls = _stub(monkeypatch)
    assert main(["push", str(final), "--repo-id", "me/tiny-lcm-lora", "--private"]) == 0
    assert calls["repo"] == ("me/tiny-lcm-lora", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo, ops, _ = calls["commit"]
    files = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    assert repo == "me/tiny-lcm-lora" and sorted(op.path_in_repo for op in ops) == files  # README.md replaced
    header, body = _card(ops)
    assert header["library_name"] == "diffusers" and header["pipeline_tag"] == "text-to-image"
    assert "lora" in header["tags"] and "fewstep" in header["tags"] and "base_model" not in header  # a local base
    use = body.split("\n# ", 1)[0]  # the Hub card's own section, before the card fewstep wrote at export
    assert 'pipe.load_lora_weights("me/tiny-lcm-lora")' in use and "<this directory>" not in use
    assert "me/tiny-lcm-lora" in capsys.readouterr().out


@pytest.mark.slow
def test_push_of_a_full_pipeline_names_its_base_and_license(tmp_path, tiny_dirs, captioned_dir, monkeypatch):
    from fewstep.push import hub_card

    out = tmp_path / "run"
    assert main(smoke_args("sd15_lcm", out, tiny_dirs, captioned_dir)) == 0
    final = out / "final"
    meta_path = final / "fewstep.json"
    import json

    meta = json.loads(meta_path.read_text())
    meta["teacher"] = "pipeline: stable-diffusion-v1-5/stable-diffusion-v1-5"  # as the shipped recipe names it
    meta_path.write_text(json.dumps(meta))
    header, body = _card([type("Op", (), {"path_in_repo": "README.md",
                                          "path_or_fileobj": hub_card(final, "me/sd15-lcm").encode()})()])
    assert header["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert header["license"] == "creativeml-openrail-m" and "diffusers:StableDiffusionPipeline" in header["tags"]
    assert 'diffusers.StableDiffusionPipeline.from_pretrained("me/sd15-lcm")' in body


def test_push_refuses_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    calls = _stub(monkeypatch)
    assert main(["push", str(tmp_path), "--repo-id", "me/x"]) == 2
    assert "is not a fewstep model directory" in capsys.readouterr().err
    assert main(["push", "fewstep/assets/digits_teacher", "--repo-id", "bad id!"]) == 2
    assert "is not a Hub repository id" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", "fewstep/assets/digits_teacher", "--repo-id", "me/x"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert calls == {}


def test_push_commits_every_file_of_a_final_directory_with_the_card_header(tmp_path, monkeypatch):
    """A full-pipeline final/ as the export writes it (fewstep.json, model_index.json, components), without training."""
    final = tmp_path / "final"
    (final / "unet").mkdir(parents=True)
    (final / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (final / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (final / "README.md").write_text("# sdxl_fdistill_js/fdistill\n\nlocal card\n")
    (final / "fewstep.json").write_text(json.dumps({
        "fewstep_version": "0", "kind": "pipeline", "recipe": "sdxl_fdistill_js/fdistill", "method": "fdistill",
        "teacher": "pipeline: stabilityai/stable-diffusion-xl-base-1.0", "scheduler": "LCMScheduler",
        "sampler": {"solver": "renoise", "steps": 1, "guidance": None}}))
    calls = _stub(monkeypatch)
    assert main(["push", str(final), "--repo-id", "me/sdxl-1step"]) == 0
    repo, ops, kw = calls["commit"]
    assert sorted(op.path_in_repo for op in ops) == ["README.md", "fewstep.json", "model_index.json",
                                                     "unet/diffusion_pytorch_model.safetensors"]
    header, body = _card(ops)
    assert header == {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "license": "openrail++",
                      "library_name": "diffusers", "pipeline_tag": "text-to-image",
                      "tags": ["fewstep", "distillation", "1-step", "fdistill", "diffusers:StableDiffusionXLPipeline"]}
    assert 'diffusers.StableDiffusionXLPipeline.from_pretrained("me/sdxl-1step")' in body
    assert "num_inference_steps=1, guidance_scale=0.0" in body and body.rstrip().endswith("local card")
    assert kw["commit_message"] == "fewstep: sdxl_fdistill_js/fdistill"
