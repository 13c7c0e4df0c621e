"""Batching dataset items (dicts) into batches: tensors stacked, numbers to tensors, strings to lists."""
from __future__ import annotations

import torch


def collate(items: list[dict]) -> dict:
    keys = items[0].keys()
    out = {}
    for k in keys:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], (int, float)):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out
