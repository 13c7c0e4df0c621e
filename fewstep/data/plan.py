"""Which items and seeds make each micro-batch: a pure function of (seed, step, micro-batch, process).

Global sample positions of optimizer step ``s`` are ``s * G ... (s + 1) * G - 1`` with
``G = batch_size * grad_accum * world_size``; micro-batch ``m`` of process ``r`` takes the ``b``
positions starting at ``s * G + (m * world_size + r) * b``. A position maps to a dataset index
through a per-epoch permutation seeded by (seed, epoch), and to a per-sample seed
(fewstep.rng.sample_seed). So batch 8 with accumulation 2, batch 16, and two processes at batch 8
see the same samples with the same noise, and a resumed run continues exactly.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..errors import FewstepError
from ..rng import sample_seed
from .collate import collate


def is_stream(dataset) -> bool:
    """True for iterable (streamed) datasets, which have no length and no random access."""
    return isinstance(dataset, IterableDataset)


class ArrayDataset(Dataset):
    """In-memory tensors with a vectorized ``get_batch`` (digits, mixtures, pairs)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        lengths = {len(v) for v in tensors.values()}
        if len(lengths) != 1:
            raise FewstepError(f"ArrayDataset tensors differ in length: { {k: len(v) for k, v in tensors.items()} }")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.tensors.items()}

    def get_batch(self, idx: list[int]) -> dict:
        index = torch.as_tensor(idx, dtype=torch.long)
        return {k: v[index] for k, v in self.tensors.items()}


class BatchPlan:
    def __init__(self, num_items: int | None, batch_size: int, grad_accum: int = 1, world_size: int = 1, seed: int = 0) -> None:
        if num_items is not None and num_items < 1:
            raise FewstepError("the dataset is empty")
        self.n, self.b, self.accum, self.world, self.seed = num_items, batch_size, grad_accum, world_size, seed
        self._perm: tuple[int, Tensor] | None = None

    @property
    def global_batch(self) -> int:
        return self.b * self.accum * self.world

    def positions(self, step: int, micro: int, rank: int) -> range:
        start = step * self.global_batch + (micro * self.world + rank) * self.b
        return range(start, start + self.b)

    def index(self, position: int) -> int:
        if self.n is None:
            return position
        epoch, offset = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, -1 - epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][offset])

    def seeds(self, positions: range) -> Tensor:
        return torch.tensor([sample_seed(self.seed, p) for p in positions], dtype=torch.long)


class BatchSource:
    """Micro-batches of a dataset in plan order, from ``start_step`` on, with ``seeds`` added.

    Map-style datasets are indexed directly (``get_batch`` when they have it) or through a
    DataLoader with ``num_workers`` prefetching. Iterable datasets are streamed in order (epochs
    repeat the stream); a resumed run skips the positions already consumed.
    """

    def __init__(self, dataset: Dataset, plan: BatchPlan, *, rank: int = 0, start_step: int = 0, num_workers: int = 0) -> None:
        self.dataset, self.plan, self.rank = dataset, plan, rank
        self.iterable = is_stream(dataset)
        self._loader: Iterator | None = None
        self._stream: Iterator | None = None
        self._stream_pos = 0
        if not self.iterable and num_workers > 0:
            self._loader = iter(DataLoader(dataset, batch_sampler=self._index_lists(start_step), num_workers=num_workers,
                                           collate_fn=collate, persistent_workers=False))

    def _index_lists(self, start_step: int) -> Iterator[list[int]]:
        step = start_step
        while True:
            for micro in range(self.plan.accum):
                yield [self.plan.index(p) for p in self.plan.positions(step, micro, self.rank)]
            step += 1

    def _stream_items(self, positions: range) -> list[dict]:
        items = []
        for p in positions:
            while True:
                if self._stream is None:
                    self._stream = iter(self.dataset)
                if self._stream_pos > p:  # positions only move forward
                    raise FewstepError("stream positions must be read in order")
                try:
                    item = next(self._stream)
                except StopIteration:
                    if self._stream_pos == 0:
                        raise FewstepError("the streamed dataset is empty") from None
                    self._stream = None
                    continue
                pos, self._stream_pos = self._stream_pos, self._stream_pos + 1
                if pos == p:
                    items.append(item)
                    break
        return items

    def get(self, step: int, micro: int) -> dict:
        positions = self.plan.positions(step, micro, self.rank)
        if self.iterable:
            batch = collate(self._stream_items(positions))
        elif self._loader is not None:
            batch = next(self._loader)
        else:
            idx = [self.plan.index(p) for p in positions]
            get_batch = getattr(self.dataset, "get_batch", None)
            batch = get_batch(idx) if get_batch is not None else collate([self.dataset[i] for i in idx])
        batch["seeds"] = self.plan.seeds(positions)
        return batch
