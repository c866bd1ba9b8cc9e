"""A GPT decoder (nanoGPT style) that Sparse-IFT transformations can rewrite.

The four Linear layers in each block (``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj``) are
called only as modules, never through their ``.weight``, so model surgery may replace them with
any module mapping the same shapes (parallel branches, a U-then-V factorisation, a masked Linear).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "GPT_PRESETS", "gpt_config", "gpt_forward_macs"]


@dataclass
class GPTConfig:
    """Sizes of a GPT decoder. Plain fields only, so a LightningCLI YAML can build it."""

    vocab_size: int
    """Number of token ids; 256 for byte-level text, 50257 for the GPT-2 BPE."""
    block_size: int
    """Longest sequence the model accepts (rows of the position embedding)."""
    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Attention heads per block; must divide ``d_model``."""
    d_model: int
    """Width of the residual stream."""
    d_ff: Optional[int] = None
    """Hidden width of the MLP. ``None`` means ``4 * d_model`` (resolved in ``__post_init__``, so
    after construction it is always an int: ``dataclasses.replace(cfg, d_model=...)`` keeps the
    old value unless you also pass ``d_ff=None``)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches; 0 for pretraining."""
    bias: bool = True
    """Biases in Linear layers and LayerNorms (GPT-2/3 have them; ``False`` is slightly faster)."""
    tie_weights: bool = True
    """Share the token embedding with the LM head (fewer parameters, as in GPT-2/3)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}.")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "choose d_model as a multiple of n_head."
            )
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if not isinstance(self.d_ff, int) or self.d_ff < 1:
            raise ValueError(f"GPTConfig.d_ff must be a positive int or None, got {self.d_ff!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head


GPT_PRESETS: dict[str, dict[str, Any]] = {
    # Byte-level toy model for unit tests: builds and runs in milliseconds on a CPU.
    "gpt_tiny": dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, d_model=64),
    # Byte-level model for CPU studies (~0.8M non-embedding parameters).
    "gpt_mini": dict(vocab_size=256, block_size=256, n_layer=4, n_head=4, d_model=128),
    # GPT-3 Small (Brown et al. 2020, Table 2.1): 125M parameters. The vocabulary is the
    # GPT-2 BPE's 50257; pass vocab_size=50304 (a multiple of 64) for faster matmuls.
    "gpt3_small": dict(vocab_size=50257, block_size=2048, n_layer=12, n_head=12, d_model=768),
}


def gpt_config(name: str, **overrides: Any) -> GPTConfig:
    """Build a :class:`GPTConfig` from a preset in :data:`GPT_PRESETS`.

    Args:
        name: Preset name, e.g. ``"gpt_tiny"``.
        **overrides: Fields to change, e.g. ``dropout=0.1``.

    Raises:
        ValueError: If the preset or an override field does not exist.
    """
    if name not in GPT_PRESETS:
        raise ValueError(f"Unknown GPT preset {name!r}; valid presets: {sorted(GPT_PRESETS)}.")
    fields = sorted(f.name for f in dataclasses.fields(GPTConfig))
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"Unknown GPTConfig field(s) {unknown}; valid fields: {fields}.")
    return GPTConfig(**{**GPT_PRESETS[name], **overrides})


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused Q/K/V projection."""

    def __init__(self, config: GPTConfig, **factory: Any) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.d_model = config.d_model
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias, **factory)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias, **factory)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.d_model, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hd): heads become a batch dimension for SDPA.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear, GELU, Linear."""

    def __init__(self, config: GPTConfig, **factory: Any) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias, **factory)
        self.act = nn.GELU()
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias, **factory)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))  # (B, T, C) -> (B, T, d_ff) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: GPTConfig, **factory: Any) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, bias=config.bias, **factory)
        self.attn = CausalSelfAttention(config, **factory)
        self.ln2 = nn.LayerNorm(config.d_model, bias=config.bias, **factory)
        self.mlp = MLP(config, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))  # (B, T, C)
        return x + self.mlp(self.ln2(x))  # (B, T, C)


class GPT(nn.Module):
    """GPT decoder: token + position embeddings, ``n_layer`` pre-norm blocks, LM head.

    Args:
        config: Model sizes.
        device: Device for the parameters (``"meta"`` builds shapes without memory).
        dtype: Parameter dtype.
    """

    # fnmatch patterns of module names that Sparse-IFT transformations keep dense by default.
    # Embeddings and LayerNorms are not Linear, so they are never candidates. The LM head stays
    # dense as in the paper, while Q/K/V, the attention output and both FFN projections are
    # transformed -- so, unlike the CNNs (whose stem stays dense), the *first* Linear is not kept.
    sift_dense_layers: tuple[str, ...] = ("lm_head",)
    # Our init std (0.02, residual projections 0.02/sqrt(2 L)) ignores a layer's fan-in; SµPar's
    # init multipliers (sift_lightning.sparse.supar) depend on that.
    sift_init_scheme: str = "fixed"

    def __init__(
        self,
        config: GPTConfig,
        *,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.config = config
        factory = dict(device=device, dtype=dtype)
        self.wte = nn.Embedding(config.vocab_size, config.d_model, **factory)
        self.wpe = nn.Embedding(config.block_size, config.d_model, **factory)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, **factory) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias, **factory)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False, **factory)
        if config.tie_weights:
            # Input and output embeddings share one matrix (Press & Wolf 2017): a token's vector
            # is used both to read it in and to score it out, saving vocab_size * d_model params.
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scaled init: each block adds two residual branches, so the residual stream's
        # variance grows with depth; shrinking the branches' output projections by
        # 1/sqrt(2 * n_layer) keeps it roughly constant at initialisation.
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits.

        Args:
            idx: Token ids, shape ``(B, T)`` with ``T <= block_size``.

        Returns:
            Logits of shape ``(B, T, vocab_size)``.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"Sequence length {T} exceeds block_size={self.config.block_size}; "
                "use shorter sequences or build the model with a larger block_size."
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C) -> (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (shared tensors counted once).

        Args:
            non_embedding: Leave out the position embedding, and the token embedding when it is
                not tied (a tied one is also the LM head's weight, so it counts, as in nanoGPT).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.wte.weight.numel()
        return n

    def sift_widened(self, factor: float) -> GPT:
        """A freshly initialised GPT whose width is scaled by about ``factor`` (Sparse Wide).

        ``d_model' = n_head * max(1, round(d_model * factor / n_head))`` keeps the head count and an
        integer head size, and ``d_ff' = round(d_ff * d_model' / d_model)``. For GPT-3 Small
        (d_model=768, 12 heads) factor sqrt(2) (sparsity 0.5) gives 1092 / 4368 (the paper's
        ~1086 is not a multiple of 12) and factor 2 (sparsity 0.75) gives 1536 / 6144. Depth,
        heads, vocabulary, block size, dropout, bias and tying are unchanged; so are the
        parameters' device and dtype.

        Args:
            factor: Width multiplier, at least 1.

        Raises:
            ValueError: If ``factor < 1``.
        """
        if not factor >= 1.0:
            raise ValueError(f"sift_widened needs factor >= 1, got {factor!r}.")
        c = self.config
        d_model = c.n_head * max(1, round(c.d_model * factor / c.n_head))
        d_ff = round(c.d_ff * d_model / c.d_model)
        config = dataclasses.replace(c, d_model=d_model, d_ff=d_ff)
        ref = self.wte.weight
        return GPT(config, device=ref.device, dtype=ref.dtype)


def gpt_forward_macs(config: GPTConfig, seq_len: int) -> dict[str, int]:
    """Forward multiply-accumulates for one sequence of ``seq_len`` tokens.

    Source: Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", Table 1, per-operation
    counts) and PaLM (Chowdhery et al. 2022, Appendix B: training FLOPs per token
    ``6 N + 12 L T d``, i.e. forward ``2 N + 4 L T d``), written as MACs (FLOPs = 2 * MACs). With
    ``T = seq_len``, ``d = d_model``, ``L = n_layer``:

    - ``linear``: Q/K/V, attention output and both MLP projections,
      ``L * T * (d * 3d + d * d + 2 * d * d_ff)``.
    - ``attention``: the activation-by-activation products ``Q K^T`` and ``A V``,
      ``L * 2 * T * T * d``. We count the full ``T x T`` product although the causal mask makes
      half of it unnecessary: SDPA's math path computes it all, and ``FlopCounterMode`` counts the
      full product for the flash/efficient/cuDNN kernels too.
    - ``lm_head``: ``T * d * vocab_size``.

    Embeddings, LayerNorms, GELU, softmax and residual additions are not counted (they are not
    matmuls, and ``FlopCounterMode`` ignores them as well).

    Note: on CPU, ``FlopCounterMode`` (torch 2.14) has no formula for the kernel that SDPA picks
    when dropout is off (``aten._scaled_dot_product_flash_attention_for_cpu``) and counts 0 for
    attention; under ``sdpa_kernel(SDPBackend.MATH)`` it counts exactly ``attention`` above.

    Args:
        config: Model sizes.
        seq_len: Tokens in the sequence, ``1 <= seq_len <= block_size``.

    Returns:
        MACs per part, with keys ``"linear"``, ``"attention"``, ``"lm_head"`` and ``"total"``.
    """
    if not 1 <= seq_len <= config.block_size:
        raise ValueError(f"seq_len must be in [1, block_size={config.block_size}], got {seq_len}.")
    T, d, L = seq_len, config.d_model, config.n_layer
    macs = {
        "linear": L * T * (d * 3 * d + d * d + 2 * d * config.d_ff),
        "attention": L * 2 * T * T * d,
        "lm_head": T * d * config.vocab_size,
    }
    macs["total"] = sum(macs.values())
    return macs
