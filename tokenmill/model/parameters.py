"""Parameters built on the meta device and assigned their tensors at load time.

A model is built with every parameter on `meta` (no memory); loading then assigns each checkpoint tensor
to its parameter (`assign=True` in `load_state_dict`'s terms): the loaded tensor becomes the parameter, with
no second copy. Fused parameters (QKV, gate/up) are allocated when their first shard arrives.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


class ParameterSlots:
    """Where each parameter of a model is held (module and attribute; a tied one in several places), so
    that a tensor can replace it everywhere at once."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._slots: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        for module in model.modules():
            for leaf, param in module.named_parameters(recurse=False):
                self._slots[id(param)].append((module, leaf))

    def assign(self, name: str, value: torch.Tensor) -> nn.Parameter:
        """Makes `value` the parameter `name`; attributes set on the old one (`weight_loader`) carry over."""
        old = self.model.get_parameter(name)
        new = nn.Parameter(value, requires_grad=False)
        new.__dict__.update(old.__dict__)
        slots = self._slots.pop(id(old))
        for module, leaf in slots:
            setattr(module, leaf, new)
        self._slots[id(new)] = slots
        return new


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Uninitialized memory for every parameter still on the meta device (random-weight models)."""
    slots = ParameterSlots(model)
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            slots.assign(name, torch.empty(param.shape, dtype=dtype, device=device))
