"""Run a model once on a probe input, to check a rebuilt model before handing it back.

A shape-only pass (the ``meta`` device: no arithmetic, no memory) finds what static checks miss:
a width held outside the layers (a channel split at a fixed index, a concatenation of widths that
no longer add up) fails there, and the failing module is the innermost one still running.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["ProbeFailure", "Trace", "meta_copy", "meta_input", "trace"]


class ProbeFailure(Exception):
    """The probe pass failed inside module ``where`` (the innermost one still running)."""

    def __init__(self, where: str, error: BaseException) -> None:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        self.where, self.error, self.message = where, error, f"{type(error).__name__}: {first}"
        super().__init__(f"{where}: {self.message}")


@dataclass
class Trace:
    """What one probe pass saw: the output's shapes and the Conv/Linear layers in call order.

    ``inputs``: the layers fed the model's input tensor itself; ``outputs``: the layers whose output
    is the model's output tensor itself.
    """

    out_shapes: Any = None
    layers: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _shapes(out: Any) -> Any:
    return tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t, out)


def trace(model: nn.Module, example_input: Any) -> Trace:
    """Run ``model`` (eval mode, no grad) on ``example_input``; raise ``ProbeFailure`` naming the module that failed."""
    names = {m: n or "(the model)" for n, m in model.named_modules()}
    stack: list[str] = []
    result = Trace()
    given = {id(t) for t in tree_leaves(example_input) if isinstance(t, torch.Tensor)}
    layer_outputs: dict[int, tuple[str, torch.Tensor]] = {}  # keeps the tensors alive: ids stay unique

    def pre(m: nn.Module, args: Any) -> None:
        stack.append(names[m])
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            result.layers.append(names[m])
            if args and id(args[0]) in given:
                result.inputs.append(names[m])

    def post(m: nn.Module, _args: Any, out: Any) -> None:
        stack.pop()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(out, torch.Tensor):
            layer_outputs[id(out)] = (names[m], out)

    handles = [m.register_forward_pre_hook(pre) for m in names] + [m.register_forward_hook(post) for m in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_input, dict):
                out = model(**example_input)
            elif isinstance(example_input, (tuple, list)):
                out = model(*example_input)
            else:
                out = model(example_input)
    except Exception as err:  # noqa: BLE001  any failure is reported by the module it happened in
        raise ProbeFailure(stack[-1] if stack else "(the model)", err) from err
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    result.out_shapes = _shapes(out)
    result.outputs = [layer_outputs[id(t)][0] for t in tree_leaves(out) if id(t) in layer_outputs]
    return result


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device (parameters and buffers without storage)."""
    # deepcopy looks every tensor up in the memo first, so no storage is copied
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def meta_input(example_input: Any) -> Any:
    """``example_input`` with every tensor moved to the meta device."""
    return tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, example_input)
