"""Reflow: pairs (deterministic, resumable, split across processes), ReflowLoss, FlowDistillLoss, export."""
import json

import pytest
import torch

from fewstep.data.mixtures import make_mixture
from fewstep.denoisers import MixtureDenoiser, MLPDenoiser, MLPNet
from fewstep.errors import FewstepError
from fewstep.losses import FlowDistillLoss, ReflowLoss
from fewstep.pairs import PairsDataset, generate_pairs, pair_noise, shard_name
from fewstep.schedules import FlowSchedule, VPSchedule


def _teacher(conditional=False):
    return MixtureDenoiser(make_mixture("ring"), VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000))


def _labels(indices):
    return {"class_labels": torch.tensor([i % 8 for i in indices])}


def _gen(directory, **kw):
    args = dict(num=12, shard_size=4, batch_size=3, solver="ddim", steps=4, guidance=2.0, spacing=None, seed=0,
                shape=(2,), conditions=_labels, progress=False)
    args.update(kw)
    return generate_pairs(_teacher(), directory, **args)


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("pairs-*.safetensors"))}


def test_pairs_deterministic_per_index(tmp_path):
    _gen(tmp_path / "a")
    _gen(tmp_path / "b", shard_size=6, batch_size=6)
    a, b = PairsDataset(tmp_path / "a"), PairsDataset(tmp_path / "b")
    assert torch.equal(a.tensors["noise"], b.tensors["noise"])  # each index's noise from its own seed
    assert torch.allclose(a.tensors["x0"], b.tensors["x0"], atol=1e-5)
    assert torch.equal(a.tensors["class_labels"], torch.arange(12) % 8)
    # index 5's noise is what its seed says, and its endpoint is the teacher's DDIM solve from it
    from fewstep.solvers import make_solver, sample

    z = pair_noise(0, [5], (2,))
    assert torch.equal(a.tensors["noise"][5:6], z)
    t = _teacher()
    x1 = sample(t, make_solver("ddim"), z, t.schedule.sampling_grid(4), {"class_labels": torch.tensor([5])}, guidance=2.0)
    assert torch.allclose(a.tensors["x0"][5:6], x1, atol=1e-5)


def test_pairs_resume_after_interruption_gives_identical_shards(tmp_path):
    _gen(tmp_path / "full")
    assert len(_gen(tmp_path / "cut", max_shards=1)) == 1  # interrupted after one shard
    with pytest.raises(FewstepError, match="incomplete"):
        PairsDataset(tmp_path / "cut")
    assert len(_gen(tmp_path / "cut")) == 2  # the rerun writes only what is missing
    assert _files(tmp_path / "cut") == _files(tmp_path / "full")
    # a torn shard is regenerated, not trusted
    torn = tmp_path / "cut" / shard_name(1)
    torn.write_bytes(torn.read_bytes()[:40])
    assert [p.name for p in _gen(tmp_path / "cut")] == [shard_name(1)]
    assert _files(tmp_path / "cut") == _files(tmp_path / "full")


def test_pairs_split_across_processes_without_overlap_or_gaps(tmp_path):
    _gen(tmp_path / "one")
    w0 = _gen(tmp_path / "two", rank=0, world_size=2)
    w1 = _gen(tmp_path / "two", rank=1, world_size=2)
    assert {p.name for p in w0}.isdisjoint({p.name for p in w1})
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert torch.equal(PairsDataset(tmp_path / "two").tensors["noise"], PairsDataset(tmp_path / "one").tensors["noise"])


def test_pairs_refuse_a_directory_with_other_settings(tmp_path):
    _gen(tmp_path / "p")
    with pytest.raises(FewstepError, match="differs in steps"):
        _gen(tmp_path / "p", steps=8)
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["steps"] == 4


def _flow_student(seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(MLPNet(dim=2, hidden=16, depth=2, num_classes=0), FlowSchedule(), "flow")


def test_reflow_loss_matches_hand_computation():
    student = _flow_student()
    z, x1 = torch.randn(5, 2), torch.randn(5, 2) * 3
    seeds = torch.arange(5) + 100
    out = ReflowLoss()(phase="student", batch={"x0": x1, "noise": z, "seeds": seeds}, student=student, teacher=None)
    # InstaFlow's t ~ U(1e-3, 1), t = 0 at the noise; diffusers' s = 1 - t
    t = torch.stack([1e-3 + (1 - 1e-3) * torch.rand((), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    x_t = t[:, None] * x1 + (1 - t[:, None]) * z
    v = -student.net(x_t, (1 - t).float())  # InstaFlow's velocity is minus diffusers'
    expected = ((v - (x1 - z)) ** 2).mean()
    assert torch.allclose(out.loss, expected, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in student.net.parameters())


def test_reflow_loss_is_zero_on_a_straight_coupling():
    """If x1 = z + c for every pair, the constant velocity -c is exact and the loss vanishes."""

    class Constant(MLPDenoiser):
        def network_output(self, x_t, t, cond, timestep_cond):
            return torch.full_like(x_t, -1.5)

    student = Constant(MLPNet(dim=2, hidden=4, depth=1, num_classes=0), FlowSchedule(), "flow")
    z = torch.randn(8, 2)
    out = ReflowLoss(time_sampling="logit_normal")("student", {"x0": z + 1.5, "noise": z, "seeds": torch.arange(8)}, student, None)
    assert out.loss.item() < 1e-10


def test_reflow_refuses_a_vp_student():
    student = MLPDenoiser(MLPNet(dim=2, hidden=4, depth=1, num_classes=0), VPSchedule.from_betas("linear", 1e-4, 0.02, 1000))
    with pytest.raises(FewstepError, match="flow schedule"):
        ReflowLoss()("student", {"x0": torch.zeros(2, 2), "noise": torch.zeros(2, 2), "seeds": torch.arange(2)}, student, None)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_flow_distill_follows_diffusers_flow_match_euler(steps):
    """The k-step Euler map the loss trains is diffusers' FlowMatchEulerDiscreteScheduler run on the student."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    student = _flow_student(1)
    z, x1 = torch.randn(6, 2), torch.randn(6, 2)
    loss = FlowDistillLoss(steps=steps)("student", {"x0": x1, "noise": z, "seeds": torch.arange(6)}, student, None).loss
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(steps)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            u = student.net(x, torch.full((6,), float(t) / 1000))
            x = sched.step(u, t, x).prev_sample
    assert torch.allclose(loss, ((x - x1) ** 2).mean(), atol=1e-5)


def test_flow_distill_pseudo_huber_and_lpips_file():
    student = _flow_student(2)
    z, x1 = torch.randn(4, 2), torch.randn(4, 2)
    batch = {"x0": x1, "noise": z, "seeds": torch.arange(4)}
    c = 0.5
    loss = FlowDistillLoss(distance="pseudo_huber", huber_c=c)("student", batch, student, None).loss
    with torch.no_grad():
        d = (z - student.net(z, torch.ones(4))) - x1
    assert torch.allclose(loss, (torch.sqrt(d**2 + c * c) - c).mean(), atol=1e-5)
    with pytest.raises(FewstepError, match="lpips_vgg.safetensors not found"):
        FlowDistillLoss(distance="lpips", lpips_weights="/nonexistent/lpips_vgg.safetensors")
    with pytest.raises(FewstepError, match="valid: l2, pseudo_huber, lpips"):
        FlowDistillLoss(distance="l1")


def _sd_reflow_recipe(tmp_path, tiny_dir, **over):
    from fewstep.config import validate

    raw = {
        "name": "t", "schedule": {"name": "vp"},
        "teacher": {"kind": "pipeline", "path": str(tiny_dir)},
        "student": {"kind": "pipeline", "init": "teacher", "schedule": "flow"},
        "data": {"name": "prompts"}, "loss": {"name": "reflow"},
        "pairs": {"num": 4, "shard_size": 2, "batch_size": 2, "solver": "ddim", "steps": 2, "guidance": 1.5},
        "sample": {"solver": "euler", "steps": 1, "num": 2},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "progress": False},
    }
    raw.update(over)
    return validate(raw)


def test_sd_reflow_student_exports_and_runs_in_plain_diffusers(tmp_path, tiny_dirs):
    """The InstaFlow-style SD student: a flow reinterpretation of the UNet, exported with
    FlowMatchEulerDiscreteScheduler, sampled by the few diffusers-only lines of docs/reflow.md."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    from fewstep.build import build
    from fewstep.generate import Generator
    from fewstep.run import run_pairs

    recipe = _sd_reflow_recipe(tmp_path, tiny_dirs["sd"])
    run_pairs(recipe, progress=False, log=lambda m: None)
    recipe = _sd_reflow_recipe(tmp_path, tiny_dirs["sd"], data={"name": "pairs", "path": str(tmp_path / "run" / "pairs")})
    b = build(recipe)
    den = b.student.denoiser
    assert (den.schedule.kind, den.prediction_type) == ("flow", "flow")
    teacher_w = dict(b.teacher.denoiser.net.named_parameters())
    assert all(torch.equal(p, teacher_w[n]) for n, p in den.net.named_parameters())  # starts as the teacher's copy
    out = b.loss("student", {**b.prepare(b.dataset.get_batch([0, 1])), "seeds": torch.arange(2)}, den, None)
    assert torch.isfinite(out.loss)
    final = tmp_path / "final"
    b.export(den, final)

    ours = Generator.load(str(final))(1, seed=0, prompts=["a red bicycle"])
    # --- docs/reflow.md: run the exported student with diffusers alone
    pipe = StableDiffusionPipeline.from_pretrained(final)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    emb, _ = pipe.encode_prompt(["a red bicycle"], "cpu", 1, False)
    size = pipe.unet.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(1)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            u = pipe.unet(latents, t, encoder_hidden_states=emb).sample
            latents = pipe.scheduler.step(u, t, latents).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    # ---
    assert torch.allclose(ours, image.clamp(-1, 1), atol=1e-5)


def test_flow_distill_decode_compares_decoded_images():
    """decode=true: the distance is taken after the (differentiable) decoder, on both sides."""
    student = _flow_student(3)
    z, x1 = torch.randn(4, 2), torch.randn(4, 2)
    decoder = lambda v: torch.tanh(3 * v) + v  # noqa: E731 — a stand-in for the VAE decoder
    loss = FlowDistillLoss(decode=True, decoder=decoder)("student", {"x0": x1, "noise": z, "seeds": torch.arange(4)},
                                                         student, None).loss
    x1_hat = z - student.net(z, torch.ones(4))
    assert torch.allclose(loss, ((decoder(x1_hat) - decoder(x1)) ** 2).mean(), atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in student.net.parameters())
    with pytest.raises(FewstepError, match="decode=true needs a latent model"):
        FlowDistillLoss(decode=True)


def test_sd_pairs_end_at_sigma_zero_as_diffusers_dpm_solver(tmp_path, tiny_dirs):
    """SD 1.5's scheduler config has set_alpha_to_one false, so its DDIM clean end keeps sigma = 0.029 of noise.
    Teacher pairs solve the ODE to the data: DPM-Solver++(2M), 4 trailing steps (999 ... 249, then sigma 0),
    guidance 1.5, equal plain diffusers' StableDiffusionPipeline with DPMSolverMultistepScheduler
    (final_sigmas_type "zero") from the same noise."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    from fewstep.run import pairs_dir, run_pairs

    recipe = _sd_reflow_recipe(tmp_path, tiny_dirs["sd"], pairs={"num": 2, "shard_size": 2, "batch_size": 2,
                                                                 "solver": "dpmpp_2m", "steps": 4, "guidance": 1.5,
                                                                 "spacing": "trailing"})
    run_pairs(recipe, progress=False, log=lambda m: None)
    shard = load_file(str(next(pairs_dir(tmp_path / "run").glob("*.safetensors"))))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dirs["sd"])
    assert pipe.scheduler.config.set_alpha_to_one is False
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                             algorithm_type="dpmsolver++", solver_order=2,
                                                             final_sigmas_type="zero")
    pipe.set_progress_bar_config(disable=True)
    prompts = shard_prompts(recipe, shard)
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=1.5, latents=shard["noise"],
                  output_type="latent").images
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    torch.testing.assert_close(shard["x0"], theirs, atol=1e-4, rtol=1e-4)


def shard_prompts(recipe, shard):
    """The prompts of a shard's indices: data item i mod len(data), as pairs take them."""
    from fewstep.build import build_data

    data = build_data(recipe)
    return [data[int(i) % len(data)]["prompt"] for i in shard["index"]]
