"""Environment and safety rules that hold for the whole package."""
import importlib.util
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fewstep"


def test_torchvision_is_not_installed():
    assert importlib.util.find_spec("torchvision") is None, "torchvision breaks diffusers/transformers here"


def test_torch_load_only_with_weights_only():
    for path in PACKAGE.rglob("*.py"):
        for m in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            assert "weights_only=True" in m.group(1), f"{path}: {m.group(0)}"


def test_no_trust_remote_code():
    for path in PACKAGE.rglob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(), path
