"""The optimizer step both trainers share: backward, gradient clipping, the non-finite guard.

``OptimizerStep`` guards a step on the host with a plain optimizer and on the device with a
fused Adam/AdamW (``make_adamw(..., fused=True)``), where nothing inside a training iteration
waits for the GPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ibmd_fast.train.distributed import DistEnv

__all__ = ["OptimizerStep", "TrainingDivergedError", "MAX_CONSECUTIVE_SKIPS", "make_adamw"]

MAX_CONSECUTIVE_SKIPS = 20  # non-finite steps in a row before a run is declared diverged


class TrainingDivergedError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class OptimizerStep:
    """Backward, clip, guard, step, for one optimizer (MATH.md 4 and 5 both use it).

    The non-finite guard: when the loss or the gradient norm is NaN/Inf on any rank, the
    optimizer step is skipped on every rank (DDP has already averaged the gradients, and the
    flag is all-reduced, so all ranks agree), counted in ``skipped``, and after
    ``MAX_CONSECUTIVE_SKIPS`` in a row the run stops with ``TrainingDivergedError``. fp16
    overflows that GradScaler handles (finite loss, infinite gradients) are counted but do not
    count toward divergence: the scaler lowers its scale and carries on.

    Two ways to run it, chosen by the optimizer:

    - a plain optimizer: the guard decides on the host (two syncs per step: the loss and the
      norm become Python floats) and ``__call__`` returns ``(loss, grad_norm, stepped)`` as
      Python values; the divergence error comes at the step that diverged;
    - a fused Adam/AdamW (``fused=True``): the guard stays on the device. The skip is the
      fused kernel's own ``found_inf`` input (the one GradScaler uses), which leaves the
      parameters, both moments and the step count untouched when set, so a skipped step is
      exactly no step; the counters are device tensors, and ``__call__`` returns
      ``(loss, grad_norm, stepped)`` as 0-d device tensors. Nothing inside a step waits for the
      device; ``check()`` (at log steps) reads the counters and raises the divergence error,
      at most one log interval after the 20th non-finite step in a row.
    """

    def __init__(
        self,
        name: str,
        optimizer: torch.optim.Optimizer,
        params: list,
        scaler,
        grad_clip: float,
        env: DistEnv,
        lr_flag: str = "--lr",
    ):
        self.name = name
        self.optimizer = optimizer
        self.params = [p for p in params if p.requires_grad]
        self.scaler = scaler
        self.grad_clip = float(grad_clip)
        self.env = env
        self.lr_flag = lr_flag
        self.on_device = bool(optimizer.defaults.get("fused")) and _takes_found_inf(optimizer)
        device = self.params[0].device if self.params else env.device
        self._skipped: Any = torch.zeros((), dtype=torch.int64, device=device) if self.on_device else 0
        self._consecutive: Any = torch.zeros((), dtype=torch.int64, device=device) if self.on_device else 0
        self._last: tuple = (None, None)  # the latest loss and norm (device tensors), for the error message

    # ``skipped`` and ``consecutive`` read as Python ints (on the device path: a sync, so read them at log
    # and checkpoint steps only).
    @property
    def skipped(self) -> int:
        return int(self._skipped)

    @property
    def consecutive(self) -> int:
        return int(self._consecutive)

    def __call__(self, loss: torch.Tensor) -> tuple:
        """``(loss, grad_norm, stepped)``: Python values, or 0-d device tensors with a fused optimizer."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.on_device:
            return self._step_on_device(loss.detach().float(), grad_norm.detach().float())
        grad_norm = float(grad_norm)
        loss_value = float(loss.detach())
        # DDP averaged the gradients, so the norm (and grad_bad) is the same on every rank; the
        # loss is per rank, so its flag is all-reduced.
        grad_bad = not math.isfinite(grad_norm)
        loss_bad = self.env.any(not math.isfinite(loss_value))
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips by itself when it found inf/NaN gradients
            self.scaler.update()
        elif not (loss_bad or grad_bad):
            self.optimizer.step()
        # Free the gradients now: the other network's phase does not need them held (MATH.md 5).
        self.optimizer.zero_grad(set_to_none=True)
        stepped = not (loss_bad or grad_bad)
        if stepped:
            self._consecutive = 0
            return loss_value, grad_norm, True
        self._skipped += 1
        diverging = loss_bad or not self.scaler.is_enabled()
        self._consecutive = self._consecutive + 1 if diverging else 0
        self._last = (loss_value, grad_norm)
        self.check()
        return loss_value, grad_norm, False

    def _step_on_device(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple:
        loss_bad = ~torch.isfinite(loss)
        if self.env.distributed:  # one decision for every rank, without leaving the device
            flag = loss_bad.float()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            loss_bad = flag > 0
        bad = loss_bad | ~torch.isfinite(grad_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # the scaler hands the fused kernel its own found_inf
            self.scaler.update()
        else:
            self.optimizer.found_inf = bad.float()
            self.optimizer.grad_scale = None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        self.optimizer.zero_grad(set_to_none=True)
        diverging = loss_bad if self.scaler.is_enabled() else bad
        self._skipped = self._skipped + bad.long()
        self._consecutive = torch.where(diverging, self._consecutive + 1, torch.zeros_like(self._consecutive))
        self._last = (loss, grad_norm)
        return loss, grad_norm, ~bad

    def check(self) -> None:
        """Raise ``TrainingDivergedError`` after ``MAX_CONSECUTIVE_SKIPS`` non-finite steps in a row."""
        consecutive = self.consecutive
        if consecutive >= MAX_CONSECUTIVE_SKIPS:
            loss, norm = (None if v is None else float(v) for v in self._last)
            raise TrainingDivergedError(
                f"training diverged: {consecutive} consecutive non-finite {self.name} losses or gradients "
                f"(last loss {loss}, grad norm {norm}); lower {self.lr_flag}"
            )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        if self.on_device:
            self._skipped.fill_(int(state["skipped"]))
            self._consecutive.fill_(int(state["consecutive"]))
        else:
            self._skipped = int(state["skipped"])
            self._consecutive = int(state["consecutive"])


def _takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` attribute (torch's fused Adam and AdamW do)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(
        getattr(optimizer, "_step_supports_amp_scaling", False)
    )


def make_adamw(params, lr: float, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay 0 (the trainers' optimizer); ``fused=True`` is torch's one-kernel
    AdamW, whose step ``OptimizerStep`` guards on the device (no host sync)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **({"fused": True} if fused else {}))
