"""Wrapping a layer by swapping its `forward`, as sd-scripts does, and undoing it exactly.

Shared by every adapter module (LoRA/LoCon, LyCORIS): the wrapped layer stays out of the adapter's
`parameters()`/`state_dict()`, and `remove()` leaves no trace on it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


class ForwardSwap:
    """Mixin for an adapter nn.Module holding one wrapped layer in `self._org = [layer]`."""

    _org: list[nn.Module]
    _org_forward: Optional[Callable[..., torch.Tensor]] = None
    _had_instance_forward: bool = False

    @property
    def org_module(self) -> nn.Module:
        """The wrapped Linear/Conv2d."""
        return self._org[0]

    @property
    def applied(self) -> bool:
        return self._org_forward is not None

    def apply(self) -> None:
        """Route the original layer's forward through this module (idempotent)."""
        if self.applied:
            return
        org = self.org_module
        self._had_instance_forward = "forward" in org.__dict__
        self._org_forward = org.forward
        org.forward = self.forward  # type: ignore[attr-defined]

    def remove(self) -> None:
        """Give the original layer back its own forward, exactly as it was."""
        if not self.applied:
            return
        org = self.org_module
        if self._had_instance_forward:
            org.forward = self._org_forward
        else:
            del org.forward
        self._org_forward = None

    @property
    def wrapped_forward(self) -> Callable[..., torch.Tensor]:
        """The wrapped layer's own forward, whether or not this module is applied."""
        return self._org_forward if self._org_forward is not None else self.org_module.forward
