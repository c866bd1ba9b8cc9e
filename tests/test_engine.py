"""DynamicSparsity without a trainer, and the same engine under Lightning and Hugging Face's Trainer.

The central check: the same settings, seed and batches give bitwise identical masks and weights
after several RigL updates in a plain PyTorch loop, under ``SparsityCallback`` in a Lightning
``Trainer`` and under ``SparsityTrainerCallback`` in a ``transformers.Trainer``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sift_lightning import DynamicSparsity, ImageClassifier, SparsityCallback, SparsitySettings, mark_sparse, sparse_targets
from sift_lightning.sparse.masks import get_mask, sparse_parameters

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from sift_lightning.hf import ENGINE_STATE_NAME, SparsityTrainerCallback  # noqa: E402

SETTINGS = dict(sparsity=0.75, algorithm="rigl", update_frequency=2, drop_fraction=0.5, end=1.0, seed=3)
STEPS, BATCH, T = 6, 4, 16


# ---------------------------------------------------------------- one tiny Llama, three trainers
def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=T, attention_dropout=0.0)
    return LlamaForCausalLM(cfg)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (STEPS * BATCH, T), generator=torch.Generator().manual_seed(1))


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _plain_loop() -> dict[str, torch.Tensor]:
    ds = DynamicSparsity(SparsitySettings(**SETTINGS))
    model = ds.apply(_llama())
    opt = _sgd(model.parameters())
    ds.attach(opt, total_steps=STEPS)
    for x in _tokens().split(BATCH):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert ds.steps == [STEPS] and ds.updates == STEPS // 2
    return _snapshot(model)


class _LightningLlama(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _llama()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _sgd(self.parameters())


def _lightning() -> dict[str, torch.Tensor]:
    module = _LightningLlama()
    cb = SparsityCallback(**SETTINGS)
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(_tokens()), batch_size=BATCH))
    assert cb.engine.steps == [STEPS]
    return _snapshot(module.model)


class _SequentialTrainer(Trainer):
    """Batches in order, loss as the model computes it: the same arithmetic as the other two loops."""

    def get_train_dataloader(self) -> DataLoader:
        return self.accelerator.prepare(DataLoader(self.train_dataset, batch_size=BATCH, collate_fn=_collate))

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, **kwargs: Any) -> Any:
        return model(**inputs).loss


def _collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    x = torch.stack(rows)
    return {"input_ids": x, "labels": x}


def _hf(tmp_path, max_steps: int = STEPS, resume: bool = False, save_steps: int | None = None,
        cb: SparsityTrainerCallback | None = None) -> tuple[nn.Module, SparsityTrainerCallback]:
    model = _llama()
    cb = cb or SparsityTrainerCallback(**SETTINGS)
    opt = _sgd(model.parameters()) if cb.engine.settings.transform is None else None
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=BATCH, max_grad_norm=0.0,
        use_cpu=True, report_to=[], logging_steps=1, disable_tqdm=True, seed=0, data_seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
    )
    trainer = _SequentialTrainer(model=model, args=args, train_dataset=list(_tokens()), callbacks=[cb])
    if opt is None:  # a member that adds parameters: the optimizer must see the transformed model
        opt = _sgd(trainer.model.parameters())
    trainer.optimizer, trainer.lr_scheduler = opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer.model, cb


def test_plain_loop_lightning_and_hf_agree_bitwise(tmp_path):
    plain = _plain_loop()
    lightning = _lightning()
    hf_model, cb = _hf(tmp_path)
    hf = _snapshot(hf_model)
    assert cb.engine.steps == [STEPS] and cb.engine.updates == STEPS // 2
    masks = [k for k in plain if k.endswith("_sift_mask")]
    assert len(masks) == 2 * 7  # q, k, v, o, gate, up, down of both layers (the embedding is the stem); not lm_head
    assert plain.keys() == lightning.keys() == hf.keys()
    start = _snapshot(DynamicSparsity(SparsitySettings(**SETTINGS)).apply(_llama()))
    assert any(not torch.equal(start[k], plain[k]) for k in masks), "RigL never moved a mask"
    for k in plain:
        assert torch.equal(plain[k], lightning[k]), f"Lightning differs at {k}"
        assert torch.equal(plain[k], hf[k]), f"Hugging Face differs at {k}"
    for full, owner, local, param in sparse_parameters(hf_model):
        assert torch.count_nonzero(param[~get_mask(owner, local)]) == 0, full


def test_hf_resume_restores_the_engine(tmp_path):
    full_model, full_cb = _hf(tmp_path / "full")
    _hf(tmp_path / "part", max_steps=STEPS, save_steps=4)  # writes checkpoint-4 (and -6)
    assert (tmp_path / "part" / "checkpoint-4" / ENGINE_STATE_NAME).is_file()
    # resume from step 4 in a fresh process-like setup: new model, new callback
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoint-6")
    model, cb = _hf(tmp_path / "part", resume=True, save_steps=4)
    assert cb.engine.steps == [STEPS]
    assert torch.equal(cb.engine.generator.get_state(), full_cb.engine.generator.get_state())
    got, want = _snapshot(model), _snapshot(full_model)
    for k in want:
        if k.endswith("_sift_mask"):
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_hf_resume_without_engine_state_is_one_line(tmp_path):
    _hf(tmp_path, max_steps=4, save_steps=4)
    (tmp_path / "checkpoint-4" / ENGINE_STATE_NAME).unlink()
    with pytest.raises(ValueError, match=r"^resuming at step 4 but .*sift_engine.pt does not exist"):
        _hf(tmp_path, resume=True, save_steps=4)


def test_hf_sparse_wide_must_be_applied_first(tmp_path):
    cb = SparsityTrainerCallback(sparsity=0.5, transform="sparse_wide")
    with pytest.raises(ValueError, match="sparse_wide.* builds a new model: apply it before creating the Trainer"):
        TrainerWithModel = _SequentialTrainer  # noqa: N806
        TrainerWithModel(model=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
                         args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]), callbacks=[cb])


# ---------------------------------------------------------------- two optimizers
class _TwoParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_two_optimizers_keep_their_own_masks_steps_and_end():
    torch.manual_seed(0)
    ds = DynamicSparsity(sparsity=0.5, algorithm="rigl", update_frequency=2, drop_fraction=0.5, end=0.5,
                         drop_schedule="constant", keep_ends_dense=False, exclude=["a.0", "b.2"])
    model = ds.apply(_TwoParts())
    assert sorted(sparse_targets(model)) == ["a.2.weight", "b.0.weight"]
    opt_a = torch.optim.SGD(model.a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.Adam(model.b.parameters(), lr=0.01)
    ds.attach(opt_a, total_steps=8)  # end at step 4 of opt_a: updates after its steps 2 and 4
    ds.attach(opt_b, total_steps=4)  # end at step 2 of opt_b: one update, after its step 2
    g = torch.Generator().manual_seed(0)
    history: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for i in range(8):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        for name, opt, layer in (("a", opt_a, model.a[2]), ("b", opt_b, model.b[0])):
            if name == "a" or i % 2 == 1:  # opt_b steps every other batch
                opt.step()
                after = get_mask(layer, "weight")
                history[name].append(after.clone())
                assert torch.count_nonzero(layer.weight[~after]) == 0
                for v in opt.state[layer.weight].values():
                    if torch.is_tensor(v) and v.shape == layer.weight.shape:
                        assert torch.count_nonzero(v[~after]) == 0
        opt_a.zero_grad()
        if i % 2 == 1:
            opt_b.zero_grad()
    assert ds.steps == [8, 4]
    changed_a = [j + 1 for j in range(1, 8) if not torch.equal(history["a"][j], history["a"][j - 1])]
    changed_b = [j + 1 for j in range(1, 4) if not torch.equal(history["b"][j], history["b"][j - 1])]
    assert changed_a == [2, 4] and changed_b == [2]


def test_rigl_growth_is_the_top_gradient_of_each_optimizers_own_layer():
    """Exact: the positions grown at opt_b's update are the top |grad| of b's layer among those not kept."""
    torch.manual_seed(0)
    ds = DynamicSparsity(sparsity=0.5, algorithm="rigl", update_frequency=1, drop_fraction=0.25, end=1.0,
                         drop_schedule="constant", keep_ends_dense=False, exclude=["a.0", "b.2"])
    model = ds.apply(_TwoParts())
    opt_a, opt_b = torch.optim.SGD(model.a.parameters(), lr=0.0), torch.optim.SGD(model.b.parameters(), lr=0.0)
    ds.attach(opt_a, total_steps=1)
    ds.attach(opt_b, total_steps=1)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    F.cross_entropy(model(x), y).backward()
    for opt, layer in ((opt_a, model.a[2]), (opt_b, model.b[0])):
        grad = layer.weight.grad.detach().abs().flatten().clone()
        before = get_mask(layer, "weight").flatten().clone()
        weight = layer.weight.detach().abs().flatten().clone()  # lr 0: the step leaves the weights as they are
        opt.step()
        active = int(before.sum())
        k = int(0.25 * active)
        kept = torch.zeros_like(before)
        kept[torch.topk(torch.where(before, weight, -1.0), active - k).indices] = True
        grow = torch.zeros_like(before)
        grow[torch.topk(torch.where(kept, float("-inf"), grad), k).indices] = True
        assert torch.equal(get_mask(layer, "weight").flatten(), kept | grow)


# ---------------------------------------------------------------- plain-loop details
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list) -> None:
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_plain_loop_resume_from_state_dicts_is_exact():
    settings = SparsitySettings(sparsity=0.75, algorithm="set", update_frequency=2, drop_fraction=0.5, end=1.0, seed=5)
    batches = _batches(10)
    ds = DynamicSparsity(settings)
    full = ds.apply(_mlp())
    opt = torch.optim.AdamW(full.parameters(), lr=1e-2)
    ds.attach(opt, 10)
    _train(full, opt, batches)

    ds1 = DynamicSparsity(settings)
    part = ds1.apply(_mlp())
    opt1 = torch.optim.AdamW(part.parameters(), lr=1e-2)
    ds1.attach(opt1, 10)
    _train(part, opt1, batches[:5])
    saved = {"model": part.state_dict(), "opt": opt1.state_dict(), "engine": ds1.state_dict()}

    ds2 = DynamicSparsity(settings)
    resumed = ds2.apply(_mlp())
    resumed.load_state_dict(saved["model"])
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    ds2.load_state_dict(saved["engine"])  # before attach: the step waits for its optimizer
    ds2.attach(opt2, 10)
    assert ds2.steps == [5]
    _train(resumed, opt2, batches[5:])
    assert ds2.steps == ds.steps == [10]
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_closure_optimizer_scores_after_backward():
    """LBFGS runs backward inside step(closure): the engine masks the gradient after the closure."""
    ds = DynamicSparsity(sparsity=0.5, algorithm="rigl", update_frequency=1, end=1.0)
    model = ds.apply(_mlp())
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    ds.attach(opt, 4)
    for x, y in _batches(4):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        for full, owner, local, param in sparse_parameters(model):
            assert torch.count_nonzero(param[~get_mask(owner, local)]) == 0, full
    assert ds.steps == [4] and ds.updates == 4 and not ds.holds_dense_gradients


def test_grad_scaler_skipped_step_changes_nothing():
    ds = DynamicSparsity(sparsity=0.5, algorithm="rigl", update_frequency=1, end=1.0)
    model = ds.apply(_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds.attach(opt, 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    masks = {n: get_mask(o, loc).clone() for n, o, loc, _ in sparse_parameters(model)}
    x, y = _batches(1)[0]
    scaler.scale(F.cross_entropy(model(x * float("inf")), y)).backward()  # non-finite gradients
    scaler.step(opt)
    scaler.update()
    assert ds.steps == [0] and ds.updates == 0 and not ds.holds_dense_gradients
    assert all(torch.equal(get_mask(o, loc), masks[n]) for n, o, loc, _ in sparse_parameters(model))


def test_hand_marked_layers_keep_their_sparsity():
    model = _mlp()
    mark_sparse(model[2], 0.9)
    ds = DynamicSparsity(sparsity=0.5, algorithm="static")
    with pytest.warns(UserWarning, match="marked sparse by hand"):
        ds.apply(model)
    assert sparse_targets(model) == {"2.weight": pytest.approx(0.9, abs=1 / 1024)}


def test_hand_marked_module_trains_under_the_callback():
    module = _LightningMLP()
    mark_sparse(module.net[2], 0.5)
    cb = SparsityCallback(0.5, algorithm="set", update_frequency=2, end=1.0)
    x, y = zip(*_batches(4))
    trainer = pl.Trainer(max_steps=4, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(torch.cat(x), torch.cat(y)), batch_size=8))
    assert cb.engine.updates == 2 and list(sparse_targets(module)) == ["net.2.weight"]


def test_model_pruning_with_the_callback_is_refused():
    x, y = zip(*_batches(2))
    module = _LightningMLP()
    trainer = pl.Trainer(max_steps=2, callbacks=[SparsityCallback(0.5), ModelPruning("l1_unstructured", amount=0.5)],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="^ModelPruning and SparsityCallback cannot be combined"):
        trainer.fit(module, DataLoader(TensorDataset(torch.cat(x), torch.cat(y)), batch_size=8))


def test_a_pruned_model_is_refused():
    model = _mlp()
    torch.nn.utils.prune.l1_unstructured(model[2], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"^2 is pruned with torch.nn.utils.prune"):
        DynamicSparsity(sparsity=0.5).apply(model)


class _LightningMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_weights_only_checkpoint_rebuilds_the_structure(tmp_path):
    tiny = dict(channels=(8, 16, 32, 64))
    module = ImageClassifier("resnet18", 10, in_chans=1, image_size=16, backbone_kwargs=tiny)
    cb = SparsityCallback(0.5, transform="sparse_parallel", algorithm="static")
    save = ModelCheckpoint(tmp_path, "w", save_weights_only=True)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g))
    trainer = pl.Trainer(max_steps=2, callbacks=[cb, save], logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=4))
    ckpt = torch.load(tmp_path / "w.ckpt", weights_only=False)
    assert "callbacks" not in ckpt and ckpt["sift_lightning"]["settings"]["transform"] == "sparse_parallel"
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "w.ckpt")
    assert sparse_targets(loaded) == sparse_targets(module)
    for (k, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_settings_and_engine_refuse_bad_input():
    with pytest.raises(ValueError, match="^pass DynamicSparsity either a SparsitySettings or its fields"):
        DynamicSparsity(SparsitySettings(), sparsity=0.5)
    with pytest.raises(ValueError, match=r"^call apply\(model\) before attach"):
        DynamicSparsity(sparsity=0.5).attach(torch.optim.SGD(_mlp().parameters(), lr=0.1), 10)
    ds = DynamicSparsity(sparsity=0.5)
    model = ds.apply(_mlp())
    with pytest.raises(ValueError, match="^total_steps must be the run's optimizer steps"):
        ds.attach(torch.optim.SGD(model.parameters(), lr=0.1), float("inf"))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # the sparse layer is in no optimizer
    ds.attach(opt, 10)
    F.cross_entropy(model(torch.randn(2, 8)), torch.tensor([0, 1])).backward()
    with pytest.raises(ValueError, match=r"^1 sparse parameters \(2.weight, ...\) are in no optimizer"):
        opt.step()
    assert SparsitySettings(include="layer4*").include == ["layer4*"]  # one pattern, not one per character
    with pytest.raises(ValueError, match=r"^exclude must be a list of fnmatch patterns"):
        SparsitySettings(exclude=3)
    with pytest.raises(ValueError, match=r"^transform_options \(branch_norm\) configure a member, but transform=None"):
        SparsitySettings(transform_options={"branch_norm": True})  # would have been ignored


def test_unreachable_sparsity_warns():
    with pytest.warns(UserWarning, match=r"^sparsity 0.9999 leaves less than one weight in 1 layer\(s\) \(e.g. 2.weight, "
                                         r"1024 weights\): each keeps one, so the model's sparsity is 0.9990"):
        DynamicSparsity(sparsity=0.9999).apply(_mlp())


def test_a_frozen_hand_marked_layer_outside_the_optimizer_is_named():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    mark_sparse(model[1], 0.5)
    model[1].requires_grad_(False)
    engine = DynamicSparsity(SparsitySettings(sparsity=0.5))
    engine.apply(model)
    engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), total_steps=4)
    with pytest.raises(ValueError, match=r"1 sparse parameters \(1\.weight, \.\.\.\) are frozen \(requires_grad=False\) "
                                         r"and in no optimizer.*exclude=\['1'\]"):
        engine.check_coverage()


def test_plain_loop_clips_after_prepare_step_without_the_masked_gradients():
    # the README's recipe: prepare_step masks the gradients (and scores RigL) before you clip them
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    engine = DynamicSparsity(SparsitySettings(sparsity=0.75, algorithm="rigl", update_frequency=1))
    engine.apply(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(opt, total_steps=4)
    F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 2, (16,))).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    engine.prepare_step(opt)
    layer = model[2]
    assert grads["2.weight"][~layer.weight_sift_mask].abs().sum() > 0  # backward filled the masked positions
    assert not layer.weight.grad[~layer.weight_sift_mask].any()
    active = torch.cat([(p.grad if n != "2.weight" else grads[n][layer.weight_sift_mask]).flatten()
                        for n, p in model.named_parameters()])
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) == pytest.approx(active.norm().item(), rel=1e-6)
    opt.step()  # the step's own pre-hook sees the step prepared and does not prepare it twice
    assert engine.steps == [1] and engine.updates == 1


def _mlp_engine(sparsity: float, width: int = 8) -> tuple[nn.Module, DynamicSparsity]:
    engine = DynamicSparsity(SparsitySettings(sparsity=sparsity))
    model = engine.apply(nn.Sequential(nn.Linear(4, width), nn.Linear(width, width), nn.Linear(width, width),
                                       nn.Linear(width, 2)))
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=4)
    return model, engine


def test_engine_state_from_other_settings_or_another_model_is_refused():
    # a plain loop's resume: the engine's state must belong to this engine's settings and model
    _, saved = _mlp_engine(0.5)
    state = saved.state_dict()
    with pytest.raises(ValueError, match=r"engine state was saved with transform=None, sparsity=0.5 .* but this engine "
                                         r"has transform=None, sparsity=0.75; build the engine and the model"):
        _mlp_engine(0.75)[1].load_state_dict(state)
    other = DynamicSparsity(SparsitySettings(sparsity=0.5))
    other.apply(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match=r"engine state belongs to another model: .*first difference: 2\.weight"):
        other.load_state_dict(state)
    _mlp_engine(0.5)[1].load_state_dict(state)  # its own kind loads
