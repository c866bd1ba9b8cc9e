"""Tests for the GPT model: shapes, causality, tying, gradients, presets, widening and MACs."""

import dataclasses
import math
from fnmatch import fnmatch

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from sift_lightning.models.gpt import GPT, GPT_PRESETS, GPTConfig, gpt_config, gpt_forward_macs


@pytest.fixture
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_config("gpt_tiny")).eval()


def _tokens(config: GPTConfig, B: int = 2, T: int | None = None) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T or config.block_size))


def test_output_shape(tiny):
    logits = tiny(_tokens(tiny.config, B=3, T=17))
    assert logits.shape == (3, 17, 256)
    assert torch.isfinite(logits).all()


def test_causal(tiny):
    idx = _tokens(tiny.config, B=2, T=32)
    changed = idx.clone()
    changed[:, 11:] = (changed[:, 11:] + 1) % tiny.config.vocab_size
    a, b = tiny(idx), tiny(changed)
    torch.testing.assert_close(a[:, :11], b[:, :11], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_weight_tying():
    tied = GPT(gpt_config("gpt_tiny"))
    assert tied.lm_head.weight is tied.wte.weight
    untied = GPT(gpt_config("gpt_tiny", tie_weights=False))
    assert untied.lm_head.weight is not untied.wte.weight
    emb = 256 * 64
    assert untied.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + emb
    # Non-embedding counts agree: the tied matrix counts as the LM head, the untied wte is dropped.
    assert untied.num_params() == tied.num_params()


def test_num_params_non_embedding():
    model = GPT(gpt_config("gpt_tiny"))
    assert model.num_params(False) - model.num_params() == 64 * 64  # wpe only


def test_init_std():
    torch.manual_seed(0)
    config = gpt_config("gpt_mini")
    model = GPT(config)
    block = model.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    assert block.mlp.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.attn.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.all(block.mlp.fc.bias == 0)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_every_parameter_gets_a_finite_gradient(tie_weights):
    torch.manual_seed(0)
    model = GPT(gpt_config("gpt_tiny", tie_weights=tie_weights, dropout=0.1)).train()
    idx = _tokens(model.config)
    logits = model(idx)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_presets():
    assert {"gpt_tiny", "gpt_mini", "gpt3_small"} <= set(GPT_PRESETS)
    small = gpt_config("gpt3_small")
    assert (small.n_layer, small.n_head, small.d_model, small.d_ff) == (12, 12, 768, 3072)
    assert (small.block_size, small.vocab_size) == (2048, 50257)
    assert gpt_config("gpt_tiny", dropout=0.1).dropout == 0.1
    assert gpt_config("gpt_tiny", d_model=128).d_ff == 512  # d_ff follows an overridden d_model
    for name in GPT_PRESETS:
        GPT(gpt_config(name), device="meta")


def test_unknown_preset_lists_valid_names():
    valid = str(sorted(GPT_PRESETS)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=rf"'gpt_huge'.*valid presets: {valid}"):
        gpt_config("gpt_huge")


def test_unknown_override_lists_valid_fields():
    with pytest.raises(ValueError, match=r"\['n_embd'\].*valid fields: \[.*'d_model'"):
        gpt_config("gpt_tiny", n_embd=64)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(d_model=66), r"d_model=66 is not divisible by n_head=4"),
        (dict(n_layer=0), r"n_layer must be a positive int, got 0"),
        (dict(vocab_size=-1), r"vocab_size must be a positive int"),
        (dict(d_ff=0), r"d_ff must be a positive int or None"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        gpt_config("gpt_tiny", **overrides)


def test_config_round_trips_through_a_dict():
    config = gpt_config("gpt_mini", dropout=0.1, tie_weights=False)
    assert GPTConfig(**dataclasses.asdict(config)) == config


@pytest.mark.parametrize(
    ("name", "factor", "d_model", "d_ff"),
    [
        ("gpt_tiny", 1.0, 64, 256),
        ("gpt_tiny", math.sqrt(2), 92, 368),  # 64 * 1.414 / 4 = 22.6 -> 23 per head
        ("gpt_tiny", 2.0, 128, 512),
        ("gpt3_small", math.sqrt(2), 1092, 4368),  # 768 * 1.414 / 12 = 90.5 -> 91 per head
        ("gpt3_small", 2.0, 1536, 6144),
    ],
)
def test_sift_widened(name, factor, d_model, d_ff):
    model = GPT(gpt_config(name), device="meta")
    wide = model.sift_widened(factor)
    assert wide is not model
    assert (wide.config.d_model, wide.config.d_ff) == (d_model, d_ff)
    assert dataclasses.replace(wide.config, d_model=model.config.d_model, d_ff=None) == model.config
    assert wide.wte.weight.device.type == "meta"
    assert wide.blocks[0].attn.qkv.weight.shape == (3 * d_model, d_model)
    assert wide.blocks[-1].mlp.fc.weight.shape == (d_ff, d_model)
    assert wide.lm_head.weight.shape == (model.config.vocab_size, d_model)


def test_sift_widened_keeps_dtype_and_runs():
    model = GPT(gpt_config("gpt_tiny"), dtype=torch.float64)
    wide = model.sift_widened(math.sqrt(2))
    assert all(p.dtype == torch.float64 for p in wide.parameters())
    assert wide(_tokens(wide.config, T=8)).shape == (2, 8, 256)


def test_sift_widened_rejects_shrinking():
    with pytest.raises(ValueError, match="factor >= 1"):
        GPT(gpt_config("gpt_tiny"), device="meta").sift_widened(0.5)


def test_dense_layers_pattern_keeps_only_lm_head():
    model = GPT(gpt_config("gpt_tiny"), device="meta")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    dense = [n for n in linears if any(fnmatch(n, p) for p in GPT.sift_dense_layers)]
    assert dense == ["lm_head"]
    assert len(linears) == 1 + 4 * model.config.n_layer


class _NoWeight(nn.Module):
    """A stand-in for a transformed layer: two parallel branches, no ``.weight``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d_in, d_out), nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_linear_layers_can_be_replaced(tiny):
    d, d_ff = tiny.config.d_model, tiny.config.d_ff
    tiny.blocks[0].attn.qkv = nn.Sequential(nn.Linear(d, 3 * d))
    tiny.blocks[0].attn.proj = _NoWeight(d, d)
    tiny.blocks[1].mlp.fc = nn.Sequential(nn.Linear(d, 8, bias=False), nn.Linear(8, d_ff))
    tiny.blocks[1].mlp.proj = _NoWeight(d_ff, d)
    assert tiny(_tokens(tiny.config, T=16)).shape == (2, 16, 256)


def test_block_size_overflow(tiny):
    with pytest.raises(ValueError, match=r"exceeds block_size=64.*larger block_size"):
        tiny(_tokens(tiny.config, T=65))


def _sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)  # torch's formula for the GPU kernels


def _count_flops(model: GPT, idx: torch.Tensor, **mode_kwargs) -> int:
    counter = FlopCounterMode(display=False, **mode_kwargs)
    with torch.no_grad(), counter:
        model(idx)
    return counter.get_total_flops()


@pytest.mark.parametrize("T", [64, 17])
def test_forward_macs_match_flop_counter(tiny, T):
    B = 3
    idx = _tokens(tiny.config, B=B, T=T)
    macs = gpt_forward_macs(tiny.config, T)
    assert macs["total"] == macs["linear"] + macs["attention"] + macs["lm_head"]
    # The math backend runs attention as two bmm's, which FlopCounterMode counts in full.
    with sdpa_kernel(SDPBackend.MATH):
        assert _count_flops(tiny, idx) == 2 * B * macs["total"]
    # The default CPU kernel has no formula in torch; give it the one torch uses on GPU.
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flops = _count_flops(tiny, idx, custom_mapping={cpu_sdpa: _sdpa_flops})
    assert flops == 2 * B * macs["total"]


def test_forward_macs_gpt3_small():
    macs = gpt_forward_macs(gpt_config("gpt3_small"), 2048)
    # PaLM, Appendix B: forward FLOPs per token = 2 N + 4 n_layer T d_model (full T x T product).
    n = 12 * 12 * 768**2  # non-embedding parameters without biases/LayerNorms
    assert 2 * macs["linear"] == 2048 * 2 * n
    assert 2 * macs["attention"] == 2048 * 4 * 12 * 2048 * 768
    assert macs["lm_head"] == 2048 * 768 * 50257
    with pytest.raises(ValueError, match="seq_len"):
        gpt_forward_macs(gpt_config("gpt3_small"), 2049)
