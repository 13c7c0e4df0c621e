"""Prompt sets, captions without images: a text file (one prompt a line; blank lines and lines starting with # are
skipped), a CSV, JSON Lines, JSON or Parquet file's text column, or a Hugging Face dataset's text column."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import FewstepError

#: the text column a tabular prompt set is read from when ``column`` is not given: the first of these it has
TEXT_COLUMNS = ("text", "caption", "prompt", "Prompt", "TEXT", "captions")
#: tabular prompt files by suffix (anything else is read as one prompt a line)
TABULAR = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """The prompts in ``path``: by its suffix a text file, or a .csv/.tsv/.jsonl/.json/.parquet file's ``column``."""
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            prompts = _parquet_column(path, column)
        elif suffix in TABULAR:
            columns = _records(path, suffix)
            prompts = _texts(columns[_pick(list(columns), column, f"prompt file {path}")])
        else:
            if column is not None:
                raise FewstepError(f"data.column {column!r} is for tabular prompt files ({', '.join(TABULAR)}); "
                                   f"{path} is read as one prompt a line")
            lines = path.read_text(encoding="utf-8").splitlines()
            prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    except UnicodeDecodeError:
        raise FewstepError(f"prompt file {path} is not UTF-8 text") from None
    if not prompts:
        raise FewstepError(f"prompt file {path} holds no prompts (one prompt a line, or a tabular file's text column)")
    return prompts


def _records(path: Path, suffix: str) -> dict[str, list]:
    """Columns of a CSV/TSV (header row), JSON Lines (one object a line) or JSON (a list of objects) file."""
    text = path.read_text(encoding="utf-8")
    if suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    else:
        lines = [text] if suffix == ".json" else text.splitlines()
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FewstepError(f"prompt file {path} is not valid {'JSON' if suffix == '.json' else 'JSON Lines'} "
                                   f"(line {e.lineno if suffix == '.json' else n}: {e.msg})") from None
        rows = rows[0] if suffix == ".json" and rows else rows
        if suffix == ".json" and isinstance(rows, list) and all(isinstance(r, str) for r in rows):
            rows = [{"text": r} for r in rows]  # a plain list of prompts
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise FewstepError(f"prompt file {path}: expected records (objects with a text field), one a row")
    columns: dict[str, list] = {}
    for i, row in enumerate(rows):
        for k in row:
            columns.setdefault(k, [None] * i)
        for k in columns:
            columns[k].append(row.get(k))
    return columns


def _parquet_column(path: Path, column: str | None) -> list[str]:
    """The text column of a Parquet file, read alone (a caption table's other columns can be large)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FewstepError("Parquet prompt files need pyarrow: pip install 'fewstep[datasets]'") from None
    try:  # pyarrow's errors have no common base but ArrowException, which is not always importable
        names = pq.read_schema(path).names
    except Exception as e:
        raise FewstepError(f"prompt file {path} is not readable Parquet: {str(e).splitlines()[0]}") from None
    name = _pick(names, column, f"prompt file {path}")
    return _texts(pq.read_table(path, columns=[name]).column(name).to_pylist())


def _pick(names: list, column: str | None, what: str) -> str:
    """``column``, or (None) the first of TEXT_COLUMNS among ``names``; one line naming the valid ones otherwise."""
    if column is None:
        column = next((c for c in TEXT_COLUMNS if c in names), None)
        if column is None:
            raise FewstepError(f"{what} has none of the text columns {', '.join(TEXT_COLUMNS)}; name one with "
                               f"data.column, valid: {', '.join(map(str, names)) or '(no columns)'}")
    elif column not in names:
        raise FewstepError(f"{what} has no column {column!r}; valid: {', '.join(map(str, names)) or '(no columns)'}")
    return column


def _texts(values) -> list[str]:
    """The non-empty strings of a column."""
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


def hf_prompts(name: str, split: str = "train", column: str | None = None) -> list[str]:
    """A Hugging Face dataset's (hub id, or a directory from ``save_to_disk`` or with data files) text column."""
    from .hf import open_dataset

    ds = open_dataset(name, split)
    prompts = _texts(ds[_pick(ds.column_names, column, f"dataset {name!r}")])
    if not prompts:
        raise FewstepError(f"dataset {name!r} holds no prompts in column {column or 'text'!r}")
    return prompts


class PromptDataset(Dataset):
    """Items: {"prompt": str}. ``min_prompts``: the distinct prompts a long run needs (fewstep.build.data's
    ``check_prompt_count``); 0: any number."""

    def __init__(self, prompts: list[str], min_prompts: int = 0) -> None:
        self.prompts, self.min_prompts = list(prompts), min_prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i]}
