"""ode_regression (DMD2's one-step pre-training, main/train_sd_ode.py): the loss against a brute-force
computation from the UNet and diffusers' alphas_cumprod, LPIPS on decoded images, the weights file checked with
the recipe."""
import pytest
import torch

from fewstep.errors import FewstepError


class _Built:
    """The tiny SD pipeline as a student, and the loss built as the recipe builder builds it."""

    def __init__(self, path, **loss):
        from fewstep.losses import ODERegressionLoss
        from fewstep.losses.base import Models
        from fewstep.pipelines import load_pipeline

        self.pipeline = load_pipeline(str(path))
        self.student = self.pipeline.denoiser()
        self.loss = ODERegressionLoss.from_models(Models(None, self.student, pipeline=self.pipeline),
                                                  **{"timestep": 399, **loss})


def _built(tmp_path, tiny_dirs, **loss):
    return _Built(tiny_dirs["sd"], **loss)


def test_loss_is_the_l2_of_the_x0_at_the_conditioning_timestep(tmp_path, tiny_dirs):
    b = _built(tmp_path, tiny_dirs)
    cond = b.pipeline.encode_prompts(["a cat", "a dog"])
    size = b.student.net.config.sample_size
    g = torch.Generator().manual_seed(0)
    z, x1 = torch.randn(2, 4, size, size, generator=g), torch.randn(2, 4, size, size, generator=g)
    out = b.loss("student", {"noise": z, "x0": x1, **cond, "seeds": torch.arange(2)}, b.student, None)
    with torch.no_grad():
        eps = b.pipeline.pipe.unet(z, torch.tensor([399, 399]), encoder_hidden_states=cond["encoder_hidden_states"]).sample
    abar = b.pipeline.pipe.scheduler.alphas_cumprod.double()[399]
    x0 = (z.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()
    torch.testing.assert_close(out.loss.double(), ((x0 - x1.double()) ** 2).mean(), atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.student.net.parameters())
    assert b.loss.sampler_settings() == {"timesteps": [399]}


def test_lpips_on_decoded_images_trains_the_generator(tmp_path, tiny_dirs):
    from fewstep.testing.tiny import save_random_lpips

    b = _built(tmp_path, tiny_dirs, distance="lpips", decode=True,
               lpips_weights=str(save_random_lpips(tmp_path / "lpips.safetensors")))
    cond = b.pipeline.encode_prompts(["a cat"])
    size = b.student.net.config.sample_size
    z = torch.randn(1, 4, size, size)
    same = b.loss("student", {"noise": z, "x0": b.student(z, torch.full((1,), 399.0, dtype=torch.float64), cond).detach(),
                              **cond, "seeds": torch.arange(1)}, b.student, None)
    assert float(same.loss.detach()) < 1e-6  # d(x, x) = 0
    out = b.loss("student", {"noise": z, "x0": torch.randn(1, 4, size, size), **cond, "seeds": torch.arange(1)},
                 b.student, None)
    assert float(out.loss.detach()) > 0
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.student.net.parameters())


def test_missing_lpips_weights_are_refused_before_any_stage_runs(tmp_path, monkeypatch, capsys):
    from fewstep.cli import main

    monkeypatch.setenv("FEWSTEP_WEIGHTS_DIR", str(tmp_path / "none"))
    out = tmp_path / "run"
    assert main(["distill", "sdxl_fdistill_js", f"train.output_dir={out}", "stages.ode.loss.distance=lpips"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lpips_vgg.safetensors not found" in err[0]
    assert not out.exists()


def test_a_timestep_outside_the_schedule_is_refused(tiny_dirs):
    with pytest.raises(FewstepError, match="outside the schedule's 0..999"):
        _Built(tiny_dirs["sd"], timestep=1000)
