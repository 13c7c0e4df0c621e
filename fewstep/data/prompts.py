"""Prompt files: one prompt a line (blank lines and lines starting with # are skipped)."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..errors import FewstepError


def load_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FewstepError(f"prompt file {path} is not UTF-8 text") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise FewstepError(f"prompt file {path} holds no prompts (one prompt a line)")
    return prompts


class PromptDataset(Dataset):
    """Items: {"prompt": str}."""

    def __init__(self, path: str | Path) -> None:
        self.prompts = load_prompts(path)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i]}
