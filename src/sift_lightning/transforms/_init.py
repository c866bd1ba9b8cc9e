"""How a member initialises the layers it builds: by the model's own scheme.

A Sparse-IFT model and its dense baseline should start alike, so every Conv2d/Linear a member
builds (Sparse Wide's resized layers, Factorized's and Doped's U and V, Parallel's branches) is
drawn the way the model draws its own layers. The scheme is, in this order:

1. what the model declares in ``sift_init`` (on the model or any submodule, the first found): one
   of ``INIT_RULES`` or a callable ``fn(new_layer, old_layer)`` that initialises ``new_layer`` in
   place (``old_layer`` is the dense layer it replaces; under Sparse Wide, which resizes each layer
   in place, both arguments are the resized layer);
2. ``"keep_std"`` for a model that declares ``sift_init_scheme = "fixed"`` (our GPT: normal(0, 0.02),
   residual projections 0.02 / sqrt(2 L); SµPar reads the same attribute);
3. ``"kaiming_fan_out"`` for timm ResNets (timm's ``ResNet.init_weights``);
4. ``"keep_std"`` for any other module.

Rules:
- ``kaiming_fan_out``: convs ``normal(0, sqrt(2 / (c_out K K / groups)))`` (timm ResNets, the official
  Sparse-IFT ResNets); Linear layers keep PyTorch's default, as timm's ResNet leaves its ``fc``.
- ``keep_std``: ``normal(0, std of the dense layer replaced)`` -- a fixed-std scheme (GPT-2 style)
  keeps each layer's scale, residual projections included. Biases likewise: ``normal(0, std of the
  replaced bias)``, so zero where it was zero (our GPT) and the scale of PyTorch's default draw for a
  user's ``nn.Linear`` (a dense model and its Sparse-IFT model start alike, biases included).
- ``torch_default``: PyTorch's ``reset_parameters`` on the new shape.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import torch
from torch import nn

__all__ = ["INIT_RULES", "InitRule", "bias_std", "declared_attr", "init_like_", "init_rule", "kaiming_fan_out_std",
           "weight_std"]

INIT_RULES = ("kaiming_fan_out", "keep_std", "torch_default")
InitRule = Union[str, Callable[[nn.Module, nn.Module], None]]


def declared_attr(model: nn.Module, attr: str) -> Any:
    """The first non-None ``attr`` on ``model`` or its submodules (how a model declares ``sift_*`` settings)."""
    for module in model.modules():
        value = getattr(module, attr, None)
        if value is not None:
            return value
    return None


def _is_timm_resnet(model: nn.Module) -> bool:
    try:
        from timm.models.resnet import ResNet
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, ResNet)


def init_rule(model: nn.Module) -> InitRule:
    """The rule for layers built inside ``model`` (see the module docstring for the order).

    Raises:
        ValueError: ``model`` declares a ``sift_init`` that is neither a known rule nor callable.
    """
    declared = declared_attr(model, "sift_init")
    if declared is not None:
        if callable(declared) or declared in INIT_RULES:
            return declared
        raise ValueError(
            f"sift_init must be one of {', '.join(INIT_RULES)} or a callable fn(new_layer, old_layer), "
            f"got {declared!r}; fix the model's sift_init attribute"
        )
    if declared_attr(model, "sift_init_scheme") == "fixed":
        return "keep_std"
    if _is_timm_resnet(model):
        return "kaiming_fan_out"
    return "keep_std"


def kaiming_fan_out_std(conv: nn.Conv2d) -> float:
    """``sqrt(2 / fan_out)`` with ``fan_out = c_out K K / groups`` (kaiming normal, ReLU gain)."""
    kh, kw = conv.kernel_size
    return math.sqrt(2.0 / (conv.out_channels * kh * kw // conv.groups))


def weight_std(layer: nn.Module) -> float | None:
    """The std of ``layer``'s weight, or None on the meta device (or with fewer than 2 entries)."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.is_meta or w.numel() < 2:
        return None
    return float(w.detach().float().std())


def bias_std(layer: nn.Module) -> float:
    """The std of ``layer``'s bias: 0 without one, on the meta device, or with fewer than 2 entries."""
    b = getattr(layer, "bias", None)
    if not isinstance(b, torch.Tensor) or b.is_meta or b.numel() < 2:
        return 0.0
    return float(b.detach().float().std())


@torch.no_grad()
def init_like_(
    new: nn.Module, old: nn.Module, rule: InitRule, std: float | None = None, b_std: float | None = None
) -> nn.Module:
    """Initialise Conv2d/Linear ``new`` (built to replace ``old``) by ``rule``, in place; return it.

    Args:
        new: the layer built (any shape).
        old: the dense layer it replaces or resizes.
        rule: one of ``INIT_RULES`` or a callable (see ``init_rule``).
        std: ``old``'s weight std, when ``old`` was resized in place already (``keep_std``).
        b_std: the std ``keep_std`` draws ``new``'s bias with (default: ``old``'s bias std); other
            rules zero the bias.
    """
    if new.weight.is_meta:
        return new  # shapes only: nothing to draw
    if callable(rule):
        rule(new, old)
        return new
    if rule == "kaiming_fan_out" and isinstance(new, nn.Conv2d):
        new.weight.normal_(0.0, kaiming_fan_out_std(new))
    elif rule == "keep_std" and (std if std is not None else weight_std(old)) is not None:
        new.weight.normal_(0.0, std if std is not None else weight_std(old))
        if new.bias is not None:
            b = bias_std(old) if b_std is None else b_std
            new.bias.normal_(0.0, b) if b > 0 else new.bias.zero_()
        return new
    else:
        (nn.Conv2d if isinstance(new, nn.Conv2d) else nn.Linear).reset_parameters(new)
        return new
    if new.bias is not None:
        new.bias.zero_()
    return new
