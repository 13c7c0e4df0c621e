"""Encoder propagation (Faster Diffusion, fewstep/propagation.py) against diffusers' own UNet forward, and teacher
pairs with every speed option off against the plain sampling path."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from fewstep.propagation import PAPER_KEY_STEPS, EncoderPropagation, key_timesteps
from tests.helpers import tiny_cond_unet, tiny_unet2d


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    kw = {}
    if hasattr(c, "cross_attention_dim"):
        kw["encoder_hidden_states"] = torch.randn(batch, 4, c.cross_attention_dim, generator=g)
    if getattr(c, "num_class_embeds", None):
        kw["class_labels"] = torch.tensor([0, c.num_class_embeds - 1])[:batch]
    if getattr(c, "addition_embed_type", None) == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(batch, 1)}
    return x, kw


def _unets(tiny_dirs):
    sdxl = UNet2DConditionModel.from_pretrained(tiny_dirs["sdxl"], subfolder="unet").eval()
    return {"UNet2DModel+classes": tiny_unet2d(num_class_embeds=3), "UNet2DConditionModel": tiny_cond_unet(),
            "SDXL UNet (text_time)": sdxl}


@torch.no_grad()
def test_at_key_steps_it_is_the_unet(tiny_dirs):
    """Every call a key step: the same output as diffusers' forward (1e-6), for a class-conditional UNet2DModel,
    a cross-attention UNet and SDXL's added text/time embedding."""
    for name, unet in _unets(tiny_dirs).items():
        x, kw = _inputs(unet)
        wrapped = EncoderPropagation(unet, keys={700.0, 300.0})
        for t in (700.0, 300.0):
            want = unet(x, torch.tensor(t), **kw).sample
            got = wrapped(x, torch.tensor(t), **kw, return_dict=False)[0]
            assert torch.allclose(got, want, atol=1e-6), (name, (got - want).abs().max())
        assert wrapped.encoder_runs == wrapped.calls == 2


@torch.no_grad()
def test_between_key_steps_only_the_decoder_runs_on_the_kept_features(tiny_dirs):
    """A non-key call reuses the last key call's encoder features: after a key call at t it equals the UNet at t
    when asked again at t as a non-key call (same features); at another t it is an approximation, not the UNet."""
    for name, unet in _unets(tiny_dirs).items():
        x, kw = _inputs(unet)
        wrapped = EncoderPropagation(unet, keys={900.0})
        wrapped(x, torch.tensor(900.0), **kw)
        wrapped.keys = {500.0}  # 900 is no longer a key: the features kept at 900 are reused
        again = wrapped(x, torch.tensor(900.0), **kw, return_dict=False)[0]
        assert torch.allclose(again, unet(x, torch.tensor(900.0), **kw).sample, atol=1e-6), name
        other = wrapped(x, torch.tensor(800.0), **kw, return_dict=False)[0]
        assert (other - unet(x, torch.tensor(800.0), **kw).sample).abs().max() > 1e-4, name
        assert (wrapped.calls, wrapped.encoder_runs) == (3, 1)


def test_key_timesteps_and_refusals():
    assert key_timesteps([999, 959, 919, 879, 839, 799, 759], PAPER_KEY_STEPS) == {999.0, 959.0, 919.0, 879.0, 799.0}
    from fewstep.errors import FewstepError

    with pytest.raises(FewstepError, match="UNet2DModel and UNet2DConditionModel"):
        EncoderPropagation(torch.nn.Linear(2, 2), keys=set())


def test_pairs_with_every_option_off_are_the_plain_sampling_path_and_propagation_is_not(tmp_path):
    """The digits teacher's pairs (25 DDIM steps): options off equal fewstep.solvers.sample called directly in this
    process, bit for bit; every step a key equals them to 1e-5; the paper's keys run the encoder 7 times in 25 steps
    per batch, move the samples, and are recorded in the manifest (a directory of exact pairs refuses them)."""
    from safetensors.torch import load_file

    from fewstep.errors import FewstepError
    from fewstep.export import load_final
    from fewstep.pairs import generate_pairs, pair_noise, shard_name
    from fewstep.solvers import make_solver, sample

    teacher, _, _ = load_final("fewstep/assets/digits_teacher")
    common = dict(num=8, shard_size=8, batch_size=8, solver="ddim", steps=25, guidance=None, spacing=None, seed=3,
                  shape=(1, 8, 8), conditions=lambda idx: {"class_labels": torch.tensor(idx) % 10}, progress=False)
    out = {}
    for name, keys in (("off", None), ("all", list(range(25))), ("paper", list(PAPER_KEY_STEPS))):
        generate_pairs(teacher=teacher, directory=tmp_path / name, **common, encoder_propagation=keys)
        out[name] = load_file(tmp_path / name / shard_name(0))["x0"]
    plain_teacher = teacher.with_schedule(teacher.schedule.with_clean_end())
    z = pair_noise(3, list(range(8)), (1, 8, 8))
    with torch.no_grad():
        direct = sample(plain_teacher, make_solver("ddim"), z, plain_teacher.schedule.sampling_grid(25, None),
                        {"class_labels": torch.arange(8) % 10}, guidance=None)
    assert torch.equal(out["off"], direct.float())
    assert (out["all"] - out["off"]).abs().max() < 1e-5
    assert (out["paper"] - out["off"]).abs().max() > 1e-3
    with pytest.raises(FewstepError):
        generate_pairs(teacher=teacher, directory=tmp_path / "off", **common, encoder_propagation=list(PAPER_KEY_STEPS))
