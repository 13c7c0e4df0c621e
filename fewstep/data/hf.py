"""Hugging Face `datasets` (a local directory or a hub id) with an image column and a caption or label column.
Optional: ``pip install fewstep[datasets]``."""
from __future__ import annotations

from torch.utils.data import Dataset

from ..errors import FewstepError
from .images import to_tensor


class HFImageDataset(Dataset):
    """Items like ImageFolder's: {"x0", "prompt"?, "class_labels"?}."""

    def __init__(self, name: str, resolution: int, *, split: str = "train", image_column: str = "image",
                 caption_column: str | None = "text", label_column: str | None = None, resize: bool = True) -> None:
        self.ds = open_dataset(name, split)
        columns = self.ds.column_names
        for col in (image_column, caption_column, label_column):
            if col is not None and col not in columns:
                raise FewstepError(f"dataset {name!r} has no column {col!r}; valid: {', '.join(columns)}")
        self.resolution, self.resize = resolution, resize
        self.image_column, self.caption_column, self.label_column = image_column, caption_column, label_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[i]
        item = {"x0": to_tensor(row[self.image_column], self.resolution, resize=self.resize, name=f"row {i}")}
        if self.caption_column:
            item["prompt"] = str(row[self.caption_column])
        if self.label_column:
            item["class_labels"] = int(row[self.label_column])
        return item


def open_dataset(name: str, split: str = "train"):
    """The ``split`` of a Hugging Face dataset: a ``save_to_disk`` directory, a local dataset or a hub id."""
    try:
        import datasets
    except ImportError:
        raise FewstepError("Hugging Face datasets are optional: pip install 'fewstep[datasets]'") from None
    try:
        ds = datasets.load_from_disk(name) if _is_saved_dataset(name) else datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise FewstepError(f"cannot load dataset {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise FewstepError(f"dataset {name!r} has no split {split!r}; valid: {', '.join(ds)}")
        ds = ds[split]
    return ds


def _is_saved_dataset(name: str) -> bool:
    from pathlib import Path

    p = Path(name)
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists())
