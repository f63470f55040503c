"""An exponential moving average of the trained state, the weights QAT validates and keeps.

A short QAT run ends while SGD still jitters the latent weights across rounding
boundaries; averaging the last few hundred steps (Polyak averaging; Izmailov et al. 2018
for the flat-minimum argument) gives weights that quantize more stably. Every floating
tensor of the model's state is averaged: weights, quantizer parameters (steps, offsets)
and the BN parameters and running statistics, so the averaged model is self-consistent
enough to validate and deploy as it is.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


class WeightAverage:
    """EMA of ``model.state_dict()`` with decay ``min(decay, (1 + t) / (10 + t))`` at step t
    (the short ramp keeps the start, the post-training weights, from dominating)."""

    def __init__(self, model: nn.Module, decay: float, shadow: dict[str, torch.Tensor] | None = None) -> None:
        self.decay = float(decay)
        live = model.state_dict()  # detached views of the live tensors: they follow every optimizer step
        if shadow is None:
            shadow = {k: v.detach().clone() for k, v in live.items()}
        elif set(shadow) != set(live):
            raise ValueError("the saved weight average does not fit this model")
        self.shadow = {k: t.to(live[k].device) for k, t in shadow.items()}
        self._model = model

    def _pairs(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
        """(shadow, live) pairs of floating and other tensors, read from the model at each update: some
        quantizer kinds rebind a parameter or buffer (a new tensor), which pairs made once would miss."""
        pairs = [(self.shadow[k], v) for k, v in self._model.state_dict().items()]
        return [(s, v) for s, v in pairs if v.is_floating_point()], [(s, v) for s, v in pairs if not v.is_floating_point()]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the live state after optimizer step ``step`` (0-based, global)."""
        floats, others = self._pairs()
        if floats:
            shadows, lives = zip(*floats)
            torch._foreach_lerp_(list(shadows), list(lives), 1.0 - self.decay_at(step))
        for s, v in others:
            s.copy_(v)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The averaged state loaded into ``model`` for the block; the live one restored after."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(live)

    @torch.no_grad()
    def transform(self, model: nn.Module, edit: Callable[[nn.Module], object]) -> None:
        """Apply an in-place edit of the model (e.g. snapping latent weights) to the averaged state too:
        without it the average keeps the unedited latents and the model it validates and keeps is not
        the edited one. The live state is restored after."""
        with self.applied(model):
            edit(model)
            for k, v in model.state_dict().items():
                self.shadow[k].copy_(v)
