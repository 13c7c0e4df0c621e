import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# CI's 2 cores: 2 torch threads in one process, or 1 in each of pytest-xdist's 2 workers (the default run,
# pyproject's addopts) so that the workers do not oversubscribe the cores; FEWSTEP_TEST_THREADS=N sets it
# (1 runs the suite as a 1-core machine would, docs/contributing.md)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("FEWSTEP_TEST_THREADS", max(1, 2 // _workers))))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny SD / SDXL / SD3 / SD 3.5 / FLUX.1 [dev] pipelines saved to disk once per session: {fixture: path}."""
    from fewstep.testing.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny_pipeline(fam, root / fam) for fam in ("sd", "sdxl", "sd3", "sd35", "flux")}


@pytest.fixture(scope="session")
def captioned_dir(tmp_path_factory):
    """A captioned image folder (real sklearn digits, RGB) at the tiny pipelines' image size."""
    from fewstep.testing.tiny import save_captioned_digits

    return save_captioned_digits(tmp_path_factory.mktemp("captioned") / "images")


@pytest.fixture
def plain_one_step():
    """plain_one_step(final, prompt, guidance) -> (pipe, image in [-1, 1]): an exported SD pipeline's own
    one-step sample in plain diffusers, from seed-0 latents."""

    def plain_diffusers_one_step(final, prompt: str, guidance: float):
        """(pipe, image in [-1, 1]): the exported SD pipeline's own one-step sample from seed-0 latents."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(final)
        size = pipe.unet.config.sample_size
        latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
        image = pipe(prompt, num_inference_steps=1, guidance_scale=guidance, latents=latents, output_type="pt").images
        return pipe, image * 2 - 1

    return plain_diffusers_one_step
