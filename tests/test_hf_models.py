"""Hugging Face models built from config classes (no hub): which layers are sparse, and GPT-2's Conv1D."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from sift_lightning import DynamicSparsity, SparsitySettings, sparse_targets  # noqa: E402
from sift_lightning.hf import conv1d_to_linear  # noqa: E402
from sift_lightning.sparse.masks import get_mask, sparse_parameters  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*Model config.*")


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _owners(targets: dict[str, float]) -> set[str]:
    """Module names of the layers that were replaced (a member's sparse parts live under them)."""
    return {re.sub(r"\.(sparse|u|v|branches\.\d+)(\.\d+)?\.weight$|\.weight$", "", k) for k in targets}


def test_gpt2_conv1d_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"no Conv2d/Linear layer left to make sparse \(layers found: lm_head\); 8 "
                                         r"layer\(s\) of type Conv1D \(transformer\.h\.0\.attn\.c_attn, .*\) are not "
                                         r"Conv2d or Linear.*conv1d_to_linear\(model\) first"):
        DynamicSparsity(SparsitySettings(sparsity=0.5, transform="sparse_doped")).apply(_gpt2())


def test_conv1d_to_linear_is_exact_and_every_block_layer_becomes_sparse():
    model = _gpt2()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    conv1d_to_linear(model)
    assert torch.equal(model(ids).logits, before)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (96, 32)  # nn.Linear: (out, in)
    engine = DynamicSparsity(SparsitySettings(sparsity=0.5, transform="sparse_doped", algorithm="rigl",
                                              update_frequency=2))
    model = engine.apply(model)
    blocks = {f"transformer.h.{b}.{n}" for b in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert _owners(sparse_targets(model)) == blocks  # the first block's QKV too; the LM head stays dense
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine.attach(opt, total_steps=6)
    for _ in range(6):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert engine.updates == 2
    for full, owner, local, p in sparse_parameters(model):
        assert not p[~get_mask(owner, local)].any(), full


@pytest.mark.parametrize("make,first,last", [
    (lambda: LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)),
     "model.layers.0.self_attn.q_proj", "lm_head"),
    (lambda: BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      max_position_embeddings=16)),
     "bert.encoder.layer.0.attention.self.query", "classifier"),
])
def test_a_language_models_stem_is_its_embedding(make, first, last):
    # DESIGN: in a transformer, Q/K/V of every block are transformed; embeddings and the head are not
    for member in (None, "sparse_factorized"):
        model = DynamicSparsity(SparsitySettings(sparsity=0.5, transform=member)).apply(make())
        owners = _owners(sparse_targets(model))
        assert first in owners and last not in owners, member
        assert not any("embed" in o for o in owners)


@pytest.mark.parametrize("member", [None, "sparse_doped"])
def test_a_head_tied_to_the_embedding_is_refused_when_chosen(member):
    # masking the head would mask the embedding table; a member would untie them
    def llama() -> LlamaForCausalLM:
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, tie_word_embeddings=True))

    with pytest.raises(ValueError, match=r"^lm_head\.weight is shared with model\.embed_tokens\.weight \(tied weights\)"
                                         r".*keep lm_head dense \(exclude=\['lm_head'\]"):
        DynamicSparsity(SparsitySettings(sparsity=0.5, transform=member, keep_ends_dense=False)).apply(llama())
    model = DynamicSparsity(SparsitySettings(sparsity=0.5, transform=member)).apply(llama())  # the head stays dense
    assert model.lm_head.weight is model.model.embed_tokens.weight and sparse_targets(model)
