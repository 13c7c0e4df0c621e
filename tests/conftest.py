import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny SD / SDXL / SD3 pipelines saved to disk once per session: {family: path}."""
    from fewstep.testing.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny_pipeline(fam, root / fam) for fam in ("sd", "sdxl", "sd3")}


@pytest.fixture(scope="session")
def captioned_dir(tmp_path_factory):
    """A captioned image folder (real sklearn digits, RGB) at the tiny pipelines' image size."""
    from fewstep.testing.tiny import save_captioned_digits

    return save_captioned_digits(tmp_path_factory.mktemp("captioned") / "images")
