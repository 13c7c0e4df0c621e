"""CUDA's device rules, enforced on a CPU: run code as if ``cpu`` were an accelerator and find the tensors
that a GPU run would find on the wrong device.

On a CUDA machine a tensor made without a device (``torch.zeros(3)``, ``torch.tensor(x)``,
``torch.from_numpy``, a draw from a CPU generator) lives on the host, and an op that mixes it with a
CUDA tensor raises (0-dim host tensors excepted: CUDA takes them as scalars); so does indexing a host
tensor with CUDA indices (``cpu_table[cuda_index]``), while a CUDA tensor may be indexed with host
indices. CPU-only tests never see these errors, and neither does the ``meta`` device
(``cpu_tensor[meta_index]`` does not raise, and meta refuses legal code such as ``.item()``).

``VirtualAccelerator`` is a ``TorchFunctionMode`` that keeps the host/accelerator distinction itself, as CUDA
does, by device: the accelerator is ``cpu:0`` (``ACCELERATOR``; a CPU-only torch accepts it everywhere, and
accelerate's ``Accelerator.device`` and ``PartialState().device`` answer it inside the mode, as they answer ``cuda:0``
on a GPU), the host is ``cpu``. It checks every package's Python-level torch calls (diffusers', transformers',
accelerate's, fewstep's) and knows where each weight is (the class docstring says how). Backward runs in autograd's
engine and is not checked. It found that the loop left a pipeline's text encoders and VAE on the host (issue 41:
every SD run on prompts stopped at its first batch on a GPU), after an earlier form of it, which checked fewstep's
own calls only and could not place weights, had found ``FDivergenceLoss.generate`` indexing a host grid with
device indices.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


HOST, ACCEL = "host", "accelerator"
#: the virtual accelerator: a CPU device that is not ``cpu``
ACCELERATOR = torch.device("cpu", 0)
_FEWSTEP = Path(__file__).resolve().parents[1]
_TORCH = Path(torch.__file__).resolve().parent
_SELF = Path(__file__).resolve()


def _checked_call() -> bool:
    """Whether the torch call comes from code to check: any but torch's own Python wrappers (skipped to their caller)
    and this package's (fewstep.testing)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(str(_TORCH)) and name != str(_SELF):
            return not name.startswith(str(_FEWSTEP / "testing"))
        frame = frame.f_back
    return False


class DeviceMismatch(RuntimeError):
    """An op a CUDA run would refuse: host and accelerator tensors mixed."""


#: the ``device`` attribute's descriptor: its ``__get__`` (a new method-wrapper at each access) is what the mode sees
_DEVICE_ATTRIBUTE = torch._C.TensorBase.__dict__["device"]
_DATA_ATTRIBUTE = torch._C.TensorBase.__dict__["data"]
#: ops whose host inputs CUDA accepts next to accelerator tensors (copies between devices)
_COPIES = {torch._has_compatible_shallow_copy_type, Tensor.copy_, Tensor.__setitem__, Tensor.to, Tensor.cpu, Tensor.cuda, Tensor.new_tensor, Tensor.__deepcopy__}
#: ops whose result lives where ``self`` does, whatever else they are given (deepcopy's memo holds other tensors)
_LIKE_SELF = {Tensor.__deepcopy__}
#: index ops: an accelerator tensor may be indexed with host indices, a host tensor not with accelerator ones
_INDEX = {Tensor.__getitem__, Tensor.index_select, torch.index_select, Tensor.gather, torch.gather, Tensor.take,
          torch.take}


def _device_place(value: Any) -> str | None:
    """Where a device argument (a ``torch.device`` or its name) puts a tensor: ``cpu`` the host, ``cpu:0`` or a GPU
    the accelerator, ``meta`` nowhere (sizes without data, as loaders build first); None for anything else."""
    if isinstance(value, int):  # a CUDA ordinal
        return ACCEL
    if not isinstance(value, (str, torch.device)):
        return None
    device = torch.device(value)
    if device.type == "meta":
        return None
    return ACCEL if device.type != "cpu" or device.index is not None else HOST


def _accelerate_states() -> tuple[type, ...]:
    """accelerate's state classes: each keeps ``device`` in a dict shared by its instances."""
    from accelerate.state import AcceleratorState, PartialState

    return PartialState, AcceleratorState


class VirtualAccelerator(TorchFunctionMode):
    """``with VirtualAccelerator():`` run code under CUDA's device rules; a violation raises ``DeviceMismatch``
    naming the op and the host tensors' shapes.

    Each tensor is on the host, on the accelerator, or of unknown place (made outside Python-level torch calls and
    never placed); only host and accelerator tensors are checked against each other. A tensor made without a device
    is on the host; a result is on the accelerator when any tensor input is; an accelerator tensor's ``.device`` is
    ``cpu:0``, so ``device=x.device`` keeps x's place. Weights are where the code really put them: a parameter or
    buffer that ``Module.to(device)`` (or ``Accelerator.prepare``) moved to ``cpu:0`` is on the accelerator, one that
    no call placed is on the host when its module runs, and a gradient is where its parameter is. Build and move
    everything inside the mode: a network moved before it counts as never moved.
    """

    def __init__(self) -> None:
        super().__init__()
        self.place = WeakIdKeyDictionary()
        self.checked = 0
        self._hook = None

    def __enter__(self):
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._place_unmoved_weights)
        for state in _accelerate_states():  # accelerate's device (Accelerator.device, PartialState().device), once set
            state.device = property(lambda s: ACCELERATOR if s.__dict__.get("device") is not None else None,
                                    lambda s, v: s.__dict__.__setitem__("device", v))
        return super().__enter__()

    def __exit__(self, *exc):
        self._hook.remove()
        for state in _accelerate_states():
            del state.device  # back to the value each state keeps in its shared dict
        return super().__exit__(*exc)

    def _place_unmoved_weights(self, module: torch.nn.Module, args) -> None:
        """Before a module runs: its own weights that no call placed (loaded by C++ code, never moved) are on the
        host, where ``from_pretrained`` and ``load_state_dict`` leave them."""
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if t is not None and t not in self.place:
                self.place[t] = HOST

    def where(self, t: Tensor) -> str | None:
        return self.place.get(t)

    def _placement(self, func, args: tuple, kwargs: dict, inputs: list[Tensor]) -> str | None:
        """Where the result lives: HOST, ACCEL, or None (unknown)."""
        self_place = self.where(args[0]) if args and isinstance(args[0], Tensor) else None
        if func is Tensor.cpu:
            return HOST
        if func is Tensor.cuda:
            return ACCEL
        if func in _LIKE_SELF:
            return self_place
        if func is Tensor.to:
            rest = [*args[1:], kwargs.get("device"), kwargs.get("other")]
            moved = next((p for p in map(_device_place, rest) if p is not None), None)
            if moved is not None:
                return moved
            other = next((a for a in rest if isinstance(a, Tensor)), None)
            return self.where(other) if other is not None else self_place
        if kwargs.get("device") is not None:
            return _device_place(kwargs["device"])
        if not inputs:
            return HOST  # made without a device and without tensor inputs: on the host
        places = {self.where(t) for t in inputs}
        return ACCEL if ACCEL in places else HOST if HOST in places else None

    def _check(self, func, args: tuple, kwargs: dict, inputs: list[Tensor]) -> None:
        if func in _COPIES:
            return
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        if func in _INDEX and args and isinstance(args[0], Tensor):
            base, indices = args[0], [t for t in tree_leaves((args[1:], kwargs)) if isinstance(t, Tensor)]
            # a 0-dim integer index is read as a Python int (CUDA too: table[t] for one timestep t works)
            if self.where(base) == HOST and any(self.where(i) == ACCEL and i.dim() > 0 for i in indices):
                raise DeviceMismatch(f"{name}: a host tensor of shape {tuple(base.shape)} indexed with accelerator "
                                     f"indices (CUDA: indices should be either on cpu or on the same device as the "
                                     f"indexed tensor)")
            return
        host = [t for t in inputs if self.where(t) == HOST and t.dim() > 0]
        if host and any(self.where(t) == ACCEL for t in inputs):
            shapes = ", ".join(str(tuple(t.shape)) for t in host)
            raise DeviceMismatch(f"{name}: host tensor(s) of shape {shapes} mixed with accelerator tensors (CUDA: "
                                 f"Expected all tensors to be on the same device)")
        if func is Tensor.numpy and inputs and self.where(inputs[0]) == ACCEL:
            raise DeviceMismatch(f"{name}: an accelerator tensor converted to numpy (CUDA: call .cpu() first)")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is _DEVICE_ATTRIBUTE:  # x.device: where x is, as a device to pass on
            real = func(*args)  # meta stays meta
            return ACCELERATOR if real.type == "cpu" and self.where(args[0]) == ACCEL else real
        if getattr(func, "__self__", None) is _DATA_ATTRIBUTE and func.__name__ == "__set__":
            # p.data = moved (Module.to, a cast): p is now where the new data is
            self._tag(args[0], self.where(args[1]))
            return func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if _checked_call():
            self._check(func, args, kwargs, inputs)
            self.checked += 1
        placement = self._placement(func, args, kwargs, inputs)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._tag(t, placement)
        return out

    def _tag(self, t: Tensor, placement: str | None) -> None:
        if placement is None:
            self.place.pop(t, None)
        else:
            self.place[t] = placement


__all__ = ["ACCELERATOR", "DeviceMismatch", "VirtualAccelerator"]
