"""Exponential moving average of a model's weights, by ``lerp`` (the NVlabs/edm habit).

The released teacher and generator are EMA weights (MATH.md 5: "EMA 0.99" in the
paper's settings).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ibmd_fast.models import load_state_dict_checked

__all__ = ["EMA"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class EMA:
    """A frozen copy of ``model`` whose floating-point parameters follow ``p_ema.lerp_(p, 1 - beta)``.

    ``beta = min(decay, (1 + n) / (10 + n))`` after ``n`` updates: the usual warm-up, so a short
    run's EMA is not dominated by the initial weights (with decay 0.999, 2000 steps would
    otherwise leave ``e^-2`` of the random initialization in the release). Buffers are copied.
    ``module`` is the averaged copy (eval mode, no grad): sample or release from it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self._num_updates, self._device_updates = 0, None  # host count; device count (fused-optimizer runs)
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)

    def beta(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @property
    def num_updates(self) -> int:
        """Updates so far (after device-side updates: a host sync)."""
        return self._num_updates + (0 if self._device_updates is None else int(self._device_updates))

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self._num_updates, self._device_updates = int(value), None

    @torch.no_grad()
    def update(self, model: nn.Module, when: bool | torch.Tensor = True) -> None:
        """One EMA step toward ``model`` (DDP / compiled wrappers are looked through), if ``when``.

        ``when`` may be a boolean 0-d device tensor (``OptimizerStep``'s ``stepped`` with a fused
        optimizer): then the step is taken or not on the device, with no host sync.
        """
        if isinstance(when, torch.Tensor):
            return self._update_on_device(_unwrap(model), when)
        if not when:
            return
        model = _unwrap(model)
        weight = 1.0 - self.beta()
        ema_params = [p for p in self.module.parameters() if p.is_floating_point()]
        params = [p.detach() for p in model.parameters() if p.is_floating_point()]
        if len(ema_params) != len(params):
            raise ValueError(f"EMA tracks {len(ema_params)} parameters, the model has {len(params)}")
        if ema_params:
            torch._foreach_lerp_(ema_params, params, weight)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def _update_on_device(self, model: nn.Module, when: torch.Tensor) -> None:
        """``update`` with the warm-up count and the decision as device tensors (lerp by ``when * (1 - beta)``)."""
        ema_params = [p for p in self.module.parameters() if p.is_floating_point()]
        params = [p.detach() for p in model.parameters() if p.is_floating_point()]
        if len(ema_params) != len(params):
            raise ValueError(f"EMA tracks {len(ema_params)} parameters, the model has {len(params)}")
        if self._device_updates is None:
            self._device_updates = torch.zeros((), dtype=torch.int64, device=when.device)
        n = (self._num_updates + self._device_updates).double()
        beta = torch.clamp((1.0 + n) / (10.0 + n), max=self.decay) if self.warmup else torch.full_like(n, self.decay)
        weight = ((1.0 - beta) * when.double()).float()
        if ema_params:
            delta = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(delta, weight)
            torch._foreach_add_(ema_params, delta)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        self._device_updates += when.long()

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model`` (same architecture)."""
        _unwrap(model).load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_state_dict_checked(self.module, state["module"])
        self.num_updates = int(state["num_updates"])
        # The decay is the run's setting (it may be changed on resume); the count is the state.

    def to(self, *args, **kwargs) -> "EMA":
        self.module.to(*args, **kwargs)
        return self
