"""Trainable views of stored quantized tensors: the interface refiners train through.

A format's ``trainable(qt, spec)`` returns a :class:`TrainableView`: the continuous parameters
that may be trained (grouped by kind, so a refiner can give each group its own learning rate), a
differentiable ``weight()`` whose forward value is exactly what ``write_back()`` will store, and
``write_back()``, which returns a valid tensor of the same format and the same bits.

Discrete parts (integer codes, signs) are trained through latents and a *smooth straight-through
estimator*: the forward pass uses the hard value (round, sign); the backward pass uses the
derivative of a smooth surrogate whose sharpness a refiner raises over training (progressive
annealing: ``set_temperature`` with a falling tau). 16-bit stored floats (scales, envelopes) are
rounded to their dtype in the forward pass with an identity gradient, so training sees exactly
the function it will store.
"""
from __future__ import annotations

import torch


def ste(x: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Forward exactly ``hard``, backward the gradient of ``x`` (straight through)."""
    return hard.detach() + (x - x.detach())


def stored_float(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to a 16-bit float in the forward pass, identity gradient."""
    return ste(x, x.detach().to(dtype).float())


def smooth_round(u: torch.Tensor, tau: float) -> torch.Tensor:
    """Forward round(u); backward d/du of floor(u) + sigmoid((frac(u) - 1/2) / tau), a smooth
    staircase whose steps sharpen as tau falls (tau large: nearly the identity / (4 tau))."""
    base = torch.floor(u).detach()
    soft = base + torch.sigmoid((u - base - 0.5) / tau)
    return ste(soft, torch.round(u.detach()))


def smooth_sign(u: torch.Tensor, tau: float) -> torch.Tensor:
    """Forward sign(u) (0 -> +1); backward d/du of tanh(u / tau)."""
    hard = torch.where(u.detach() >= 0, 1.0, -1.0).to(u.dtype)
    return ste(torch.tanh(u / tau), hard)


class TrainableView(torch.nn.Module):
    """The trainable side of one stored quantized tensor. Subclasses (one per format) register
    their parameters and implement ``weight`` and ``write_back``."""

    def __init__(self):
        super().__init__()
        self.tau = 1.0

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters by kind, e.g. ``{"scales": [...], "codes": [...]}``; kinds a
        refiner does not train it sets ``requires_grad_(False)`` on."""
        raise NotImplementedError

    def set_temperature(self, tau: float) -> None:
        """Sharpness of the smooth estimators (lower: closer to the hard step)."""
        if not tau > 0:
            raise ValueError(f"temperature must be positive, got {tau}")
        self.tau = float(tau)

    def warm_start(self, weight: torch.Tensor) -> None:
        """Optionally place the latents of the discrete parts where the full-precision
        ``weight`` (out x in, float32) lies, without changing the stored value (e.g. code
        latents inside their rounding cell, AdaRound-style), so training starts with the
        information of which way each value was rounded. Default: nothing."""

    def weight(self) -> torch.Tensor:
        """The dequantized weight (out x in, float32), differentiable in the parameters; its
        value is the weight ``write_back()`` stores."""
        raise NotImplementedError

    def write_back(self):
        """A valid tensor of the same format and bits as the one the view was made from."""
        raise NotImplementedError


class TrainableLinear(torch.nn.Module):
    """A linear layer computing with a view's weight: what a refiner puts in place of a
    quantized module while it trains."""

    def __init__(self, view: TrainableView, bias: torch.Tensor | None = None):
        super().__init__()
        self.view = view
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        w = self.view.weight().to(x.dtype)
        return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def attach_views(model: torch.nn.Module, qts: dict, plan, formats: dict) -> dict:
    """Put a :class:`TrainableLinear` over the trainable view of each stored tensor in ``qts``
    (module name -> quantized tensor, with its spec in ``plan``) in place of the model's
    quantized module; -> {module name: view}. What model-scope refiners train through."""
    views = {}
    for name, qt in qts.items():
        spec = plan[name]
        view = formats[spec.format].trainable(qt, spec)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        bias = getattr(getattr(parent, child), "bias", None)
        setattr(parent, child, TrainableLinear(view, None if bias is None else bias.detach().float()))
        views[name] = view
    return views
