"""train.prompt_table: a prompt-only loss (DMD) runs the text encoder once per distinct prompt, not per batch."""
import pytest
import torch
from transformers import CLIPTextModel

from fewstep.config import validate


@pytest.fixture
def text_encoder_calls():
    """The CLIP text-encoder forwards in this process since the fixture started (a global module hook: nothing of
    fewstep's is patched); ``vae_encoder_calls`` the same for the VAE's encoder."""
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: calls.append(1) if isinstance(m, CLIPTextModel) else None)
    yield calls
    hook.remove()


@pytest.fixture
def vae_encoder_calls():
    from diffusers.models.autoencoders.vae import Encoder

    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: calls.append(1) if isinstance(m, Encoder) else None)
    yield calls
    hook.remove()


def _dmd(tmp_path, tiny_sd, table: int):
    raw = {"name": "dmd_prompts", "teacher": {"kind": "pipeline", "path": str(tiny_sd)},
           "student": {"kind": "pipeline", "init": "teacher"}, "optimizer": {"name": "AdamW", "lr": 1e-5},
           "loss": {"name": "fdistill", "divergence": "reverse_kl", "guidance": 1.75, "fake_updates": 1,
                    "fake_init": "teacher"},
           "data": {"name": "prompts"}, "sample": {"solver": "renoise", "spacing": "trailing", "steps": 1, "num": 1},
           "train": {"output_dir": str(tmp_path / f"run{table}"), "max_steps": 12, "batch_size": 4, "progress": False,
                     "sample_every": 0, "prompt_table": table}}
    return validate(raw)


def test_a_dmd_step_on_prompt_data_runs_the_text_encoder_zero_times_after_warm_up(tmp_path, tiny_dirs,
                                                                                  text_encoder_calls, vae_encoder_calls):
    """The built-in 40 prompts: the first step encodes them all (one chunk of 64, one forward); the next steps run the
    text encoder zero times. With train.prompt_table=0 every step encodes its batch (one forward a step). The VAE's
    encoder never runs: the loss needs no pixels."""
    from fewstep.run import build_loop

    for table, expected in ((10_000, [1] + [0] * 11), (0, [1] * 12)):
        loop = build_loop(_dmd(tmp_path, tiny_dirs["sd"], table), log=lambda m: None)
        source = loop._start()  # what run() does before its steps
        per_step = []
        for _ in range(12):
            before = len(text_encoder_calls)
            loop.train_step(source)
            per_step.append(len(text_encoder_calls) - before)
        assert per_step == expected, (table, per_step)
        assert set(loop.phase_steps) == {"fake_score", "generator"} and min(loop.phase_steps.values()) > 0
    assert vae_encoder_calls == []


def test_the_table_answers_what_the_encoder_answers_and_encodes_strangers_as_before(tiny_dirs, text_encoder_calls):
    """Rows equal the pipeline's own encode_prompts of the same batch (float32, 1e-6: only the batch the encoder
    saw differs); a prompt outside the list is encoded with its batch."""
    from fewstep.data.prompt_table import PromptTable
    from fewstep.pipelines import load_pipeline

    pipeline = load_pipeline(str(tiny_dirs["sd"]))
    prompts = [f"a photo of object {i}" for i in range(70)] * 2  # 70 distinct: two chunks of 64
    table = PromptTable(prompts, pipeline.encode_prompts)
    batch = ["a photo of object 3", "a photo of object 69", "a photo of object 3"]
    start = len(text_encoder_calls)
    got = table(batch)
    assert len(text_encoder_calls) - start == 2  # the two chunks, at the first call
    want = pipeline.encode_prompts(batch)
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    assert torch.equal(got["encoder_hidden_states"][0], got["encoder_hidden_states"][2])
    start = len(text_encoder_calls)
    table(batch)
    assert len(text_encoder_calls) == start  # looked up
    stranger = table(["a prompt not in the list", "a photo of object 3"])
    assert len(text_encoder_calls) == start + 1
    assert torch.equal(stranger["encoder_hidden_states"], pipeline.encode_prompts(
        ["a prompt not in the list", "a photo of object 3"])["encoder_hidden_states"])
