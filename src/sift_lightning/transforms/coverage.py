"""Does a member work on a model? One check, and the timm architectures it is measured on.

``check(build, member, sparsity, example_input)`` applies the member to a freshly built dense model
and says what happened, in one of three words:

- ``works``: the output shape is unchanged and finite, every parameter gets a finite gradient, every
  module outside the transformed layers keeps its name and type (activations included), the
  whole-model sparse MACs are within 2% of the dense model's (with the example input the members
  retune their sparsity to the dense budget when they would miss it, ``match_flops``: Sparse Wide's
  grown stem and head, or the residual shortcuts the others keep as one sparse conv as the official
  code does), and Sparse Parallel gave a norm of its own to every branch of a conv whose output feeds
  a norm;
- ``refuses``: ``transform`` raised one ValueError (its message says which layer and why) and left
  the dense model as it was;
- ``fails``: anything else -- a crash, or one of the ``works`` conditions broken (a silent change).

``TIMM_MODELS`` spans the families users pick, at tiny widths and small inputs so that the whole
grid runs in about two minutes on one core. ``tests/transforms/test_timm_coverage.py`` holds every
pair to ``works`` or ``refuses``; ``bench/timm_coverage.py`` writes the measured table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sift_lightning.transforms.doped import SparseDoped
from sift_lightning.transforms.factorized import SparseFactorized
from sift_lightning.transforms.parallel import SparseParallel, norm_path

__all__ = ["TIMM_MODELS", "Outcome", "TimmCase", "check", "check_timm"]

ISO_TOLERANCE = 0.02
_WRAPPERS = (SparseParallel, SparseDoped, SparseFactorized)


@dataclass(frozen=True)
class TimmCase:
    """A timm architecture at a size fit for a test: ``create_model(name, num_classes=10, **kwargs)``."""

    family: str
    name: str
    image_size: int = 32
    kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self) -> nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model(self.name, pretrained=False, num_classes=10, **dict(self.kwargs))

    def example_input(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size, generator=torch.Generator().manual_seed(0))


def _c(family: str, name: str, size: int = 32, **kwargs: Any) -> TimmCase:
    return TimmCase(family, name, size, tuple(kwargs.items()))


_TINY_RESNET = dict(channels=(16, 32, 64, 128))
_TINY_VIT = dict(img_size=32, patch_size=8, depth=2)
TIMM_MODELS: tuple[TimmCase, ...] = (
    _c("ResNet/ResNeXt/SE", "resnet18", **_TINY_RESNET),
    _c("ResNet/ResNeXt/SE", "resnet50", **_TINY_RESNET),
    _c("ResNet/ResNeXt/SE", "seresnet18", **_TINY_RESNET),
    _c("ResNet/ResNeXt/SE", "resnext26ts"),
    _c("ResNet/ResNeXt/SE", "resnetv2_50"),  # full width: a tiny one is mostly its 64-wide 7x7 stem
    _c("ResNet/ResNeXt/SE", "skresnet18"),
    _c("EfficientNet/MobileNet", "efficientnet_b0"),
    _c("EfficientNet/MobileNet", "tf_efficientnet_b0"),
    _c("EfficientNet/MobileNet", "mobilenetv2_035"),
    _c("EfficientNet/MobileNet", "mobilenetv3_small_050"),
    _c("EfficientNet/MobileNet", "mobilenetv4_conv_small_035"),
    _c("EfficientNet/MobileNet", "mixnet_s"),
    _c("EfficientNet/MobileNet", "ghostnet_050"),
    _c("EfficientNet/MobileNet", "rexnet_100"),
    _c("EfficientNet/MobileNet", "lcnet_050"),
    _c("EfficientNet/MobileNet", "hardcorenas_a"),
    _c("EfficientNet/MobileNet", "mnasnet_050"),
    _c("RegNet", "regnetx_002"),
    _c("RegNet", "regnety_002"),
    _c("ConvNeXt", "convnext_atto", dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
    _c("DenseNet", "densenet121", block_config=(2, 2, 2, 2)),
    _c("DLA", "dla34"),
    _c("CSP/DarkNet", "cs3darknet_focus_s", 64),
    _c("RepVGG/MobileOne", "repvgg_a0"),
    _c("RepVGG/MobileOne", "mobileone_s0"),
    _c("HRNet", "hrnet_w18_small", 64),
    _c("NFNet", "nf_resnet26"),
    _c("NFNet", "nfnet_l0"),
    _c("Inception/Xception", "inception_v3", 75),
    _c("Inception/Xception", "xception41"),
    _c("ViT/DeiT", "vit_tiny_patch16_224", **_TINY_VIT),
    _c("ViT/DeiT", "deit_tiny_patch16_224", **_TINY_VIT),
    _c("Swin", "swin_tiny_patch4_window7_224", img_size=32, window_size=2, depths=(1, 1, 1, 1), embed_dim=24,
       num_heads=(1, 1, 1, 1)),
    _c("MaxViT/CoAtNet (MaxxVit)", "coatnet_0_rw_224", 64, img_size=64, embed_dim=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
    _c("LeViT/PiT/CaiT", "levit_128s", 64, img_size=64, depth=(1, 1, 1)),
    _c("LeViT/PiT/CaiT", "pit_ti_224", 64, img_size=64),
    _c("LeViT/PiT/CaiT", "cait_xxs24_224", **_TINY_VIT),
    _c("MLP-Mixer", "mixer_s32_224", 128, img_size=128),
    _c("EdgeNeXt/FastViT/MobileViT", "edgenext_xx_small", 64),
    _c("EdgeNeXt/FastViT/MobileViT", "fastvit_t8", 64),
    _c("EdgeNeXt/FastViT/MobileViT", "mobilevit_xxs", 64),
    _c("StarNet", "starnet_s1"),
)


@dataclass
class Outcome:
    """What one member did to one model: ``status`` is ``works``, ``refuses`` or ``fails``."""

    status: str
    detail: str = ""
    mac_ratio: float | None = None
    branch_norms: tuple[int, int] | None = None  # Parallel: (convs with per-branch norms, convs feeding a norm)


def _structure(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def _norm_fed_convs(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of groups-1 convs whose output goes into a norm and no other module (seen by hooks).

    A container that hands the tensor on to one of its children does not count as a second reader.
    """
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # keeps the tensors alive: ids stay unique
    readers: dict[int, list[str]] = {}
    names = {m: n for n, m in model.named_modules()}
    norms = {n for m, n in names.items() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))}

    def conv_hook(m: nn.Module, _a: Any, out: torch.Tensor) -> None:
        outputs[id(out)] = (names[m], out)

    def pre_hook(m: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in outputs:
            readers.setdefault(id(args[0]), []).append(names[m])

    handles = [m.register_forward_hook(conv_hook) for m in names if isinstance(m, nn.Conv2d) and m.groups == 1]
    handles += [m.register_forward_pre_hook(pre_hook) for m in names]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    fed = set()
    for key, who in readers.items():
        leaves = [n for n in who if not any(o.startswith(n + ".") for o in who if o != n)]
        if len(leaves) == 1 and leaves[0] in norms:
            fed.add(outputs[key][0])
    return fed


def _outside(names: dict[str, type], transformed: list[str]) -> dict[str, type]:
    return {n: t for n, t in names.items()
            if not any(n == p or n.startswith(p + ".") for p in transformed)}


def check(
    build: Callable[[], nn.Module], member: str, sparsity: float, example_input: torch.Tensor
) -> Outcome:
    """Apply ``member`` at ``sparsity`` to ``build()`` and judge the result (see the module docstring).

    ``example_input`` is a batch of at least two; FLOPs are counted on its first sample.
    """
    from sift_lightning.flops import count_flops
    from sift_lightning.transforms import transform

    dense = build()
    x, one = example_input, example_input[:1]
    try:
        before = _structure(dense)
        budget = count_flops(dense, one).dense_macs
        out_shape = dense.eval()(x).shape
        fed = _norm_fed_convs(dense, x) if member == "sparse_parallel" else set()
        dense.train()
        try:
            model = transform(dense, member, sparsity, example_input=one)
        except ValueError as err:
            if _structure(dense) != before:
                return Outcome("fails", f"raised after changing the model: {err}")
            return Outcome("refuses", str(err))
        transformed = [n for n, m in model.named_modules() if isinstance(m, _WRAPPERS)]
        slots = [norm_path(n, m.norm_slot) for n, m in model.named_modules()
                 if isinstance(m, SparseParallel) and m.norm_slot]
        after = _structure(model)
        kept_before, kept_after = _outside(before, transformed + slots), _outside(after, transformed + slots)
        if kept_before != kept_after:
            changed = sorted(set(kept_before.items()) ^ set(kept_after.items()), key=str)[0]
            return Outcome("fails", f"module {changed[0]} outside the transformed layers changed ({changed[1].__name__})")
        y = model.train()(x)
        if y.shape != out_shape or not torch.isfinite(y).all():
            return Outcome("fails", f"output {tuple(y.shape)} (dense: {tuple(out_shape)}), finite: {bool(torch.isfinite(y).all())}")
        y.float().square().mean().backward()
        for name, p in model.named_parameters():
            if p.grad is None or not torch.isfinite(p.grad).all():
                return Outcome("fails", f"{name} gets no finite gradient")
        report = count_flops(model, one)
        ratio = report.sparse_macs / budget
        if abs(ratio - 1.0) > ISO_TOLERANCE:
            return Outcome("fails", f"sparse MACs {ratio:.4f} x dense", ratio)
        normed = None
        if member == "sparse_parallel":
            with_norm = {n for n, m in model.named_modules()
                         if isinstance(m, SparseParallel) and isinstance(m.branches[0], nn.Sequential)}
            missing = sorted(n for n in fed if n in transformed and n not in with_norm)
            if missing:
                return Outcome("fails", f"{missing[0]} feeds a norm but its branches have none", ratio)
            normed = (len(with_norm), len([n for n in fed if n in transformed]))
        return Outcome("works", "", ratio, normed)
    except Exception as err:  # noqa: BLE001  a crash is an outcome to report, not to hide
        return Outcome("fails", f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}")


def check_timm(case: TimmCase, member: str, sparsity: float = 0.75) -> Outcome:
    """``check`` on one of ``TIMM_MODELS``."""
    return check(case.build, member, sparsity, case.example_input())
