"""Shared data pieces: the error, the seeded split, exact resume of train loaders, clean imports."""

import gc
import os
import re
import subprocess
import sys
import sysconfig

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from sift_lightning.data import DataNotFoundError, EpochShuffleSampler, TextDataModule, split_indices, train_loader


def test_error_is_one_line_file_not_found():
    err = DataNotFoundError("Thing", ["/a", "/b"], "x.bin", "put it there")
    assert isinstance(err, FileNotFoundError)
    assert str(err) == "Thing not found under /a, /b (looked for x.bin); put it there"


def test_split_indices():
    train, val = split_indices(100, 10, seed=0)
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert split_indices(100, 10, seed=0) == (train, val) and split_indices(100, 10, seed=1)[1] != val
    assert split_indices(5, 0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError, match=re.escape("val_size must be in [0, 5) for a data set of 5 items, got 5")):
        split_indices(5, 5, seed=0)


def take(loader, n):
    """The first ``n`` batches of a fresh pass over ``loader``, and the loader's state after them."""
    it = iter(loader)
    batches = [next(it) for _ in range(n)]
    state = loader.state_dict()
    del it
    # Shut this pass's workers down now: workers forked while another pass's queue threads run
    # inherit their locks and take seconds to exit.
    gc.collect()
    return batches, state


def assert_resumes_exactly(make_loader, taken=3):
    """Take ``taken`` batches, save the loader state; a new loader loaded with it gives the next one."""
    first, _ = take(make_loader(), 1)
    uninterrupted, _ = take(make_loader(), taken + 1)
    expected = uninterrupted[-1]
    assert not torch.equal(first[0][0], expected[0])  # so the check below means something
    _, state = take(make_loader(), taken)
    resumed = make_loader()
    assert isinstance(resumed, StatefulDataLoader)
    resumed.load_state_dict(state)
    (got,), _ = take(resumed, 1)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_text_train_loader_resumes(tmp_path, num_workers):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"verse {i} and some words\n" for i in range(500)))

    def make_loader():
        dm = TextDataModule(dataset="files", files=[str(path)], root=str(tmp_path), block_size=8,
                            batch_size=4, num_workers=num_workers)  # fmt: skip
        dm.setup("fit")
        return dm.train_dataloader()

    assert_resumes_exactly(make_loader)


def test_shared_train_loader_resumes():
    """The loader every image module uses, on a plain tensor data set."""
    data = TensorDataset(torch.arange(60).view(30, 2), torch.arange(30))
    assert_resumes_exactly(lambda: train_loader(data, batch_size=4, num_workers=0, seed=7))


def test_imports_without_matplotlib_or_tiktoken(tmp_path):
    """A fresh interpreter whose site-packages lacks matplotlib and tiktoken imports the package."""
    farm = tmp_path / "site"
    farm.mkdir()
    site_packages = sysconfig.get_paths()["purelib"]
    for name in os.listdir(site_packages):
        if not name.startswith(("matplotlib", "tiktoken")):
            os.symlink(os.path.join(site_packages, name), farm / name)
    code = (
        f"import site, sys; site.addsitedir({str(farm)!r}); import importlib.util as u; "
        "assert u.find_spec('matplotlib') is None and u.find_spec('tiktoken') is None; "
        "import sift_lightning.data as d; d.TextDataModule(tokenizer='gpt2'); print('ok')"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


class TinyLM(L.LightningModule):
    """Records the first token of every sample it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, 8)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x[:, 0].tolist())
        logits = self.emb(x) @ self.emb.weight.T  # (B, T, 256)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_resumes_mid_epoch_with_the_next_batch(tmp_path):
    """Lightning saves the stateful loader in the checkpoint: a resumed run sees the same batches."""
    path = tmp_path / "c.txt"
    path.write_text("".join(f"verse {i} and some words\n" for i in range(300)))  # ~50 batches an epoch

    def fit(steps, ckpt_path=None, callbacks=()):
        dm = TextDataModule(dataset="files", files=[str(path)], root=str(tmp_path), block_size=16, batch_size=8)
        model = TinyLM()
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
        )  # fmt: skip
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model.seen

    uninterrupted = fit(12)
    interrupted = fit(12, callbacks=[ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)])
    assert interrupted == uninterrupted
    resumed = fit(12, ckpt_path=str(next((tmp_path / "ckpt").glob("*step=5*"))))
    assert uninterrupted[:5] + resumed == uninterrupted and len(resumed) == 7


@pytest.mark.parametrize("resume_at", [3, 6, 7, 12])  # mid epoch 0, its end, mid epoch 1, end of 1
def test_trainer_resume_is_exact_across_epochs(tmp_path, resume_at):
    """Epoch k's order depends only on (seed, k), so a resumed run reads every later epoch alike."""
    path = tmp_path / "c.txt"
    path.write_text("".join(f"verse {i} and words\n" for i in range(25)))  # 6 batches an epoch

    def fit(steps, ckpt_path=None, callbacks=()):
        dm = TextDataModule(dataset="files", files=[str(path)], root=str(tmp_path), block_size=16, batch_size=4,
                            val_fraction=0.1)
        model = TinyLM()
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
            limit_val_batches=0, enable_model_summary=False, enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks),
        )  # fmt: skip
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model.seen

    uninterrupted = fit(14)
    per_epoch = 6
    assert uninterrupted[:per_epoch] != uninterrupted[per_epoch:2 * per_epoch]  # reshuffled each epoch
    fit(14, callbacks=[ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=resume_at, save_top_k=-1)])
    resumed = fit(14, ckpt_path=str(next((tmp_path / "ckpt").glob(f"*step={resume_at}.ckpt"))))
    assert uninterrupted[:resume_at] + resumed == uninterrupted


def test_sampler_starts_at_the_trainers_epoch_and_drops_a_finished_pass():
    """``first_pass`` = epochs the trainer finished; a loader state from one of them reads nothing, then the next pass."""
    fresh = EpochShuffleSampler(12, seed=3)
    passes = [list(fresh) for _ in range(3)]
    assert len({tuple(p) for p in passes}) == 3 and all(sorted(p) == list(range(12)) for p in passes)
    assert list(EpochShuffleSampler(12, seed=3, first_pass=2)) == passes[2]

    mid = EpochShuffleSampler(12, seed=3, first_pass=1)
    mid.load_state_dict({"epoch": 1, "yielded": 5})  # the epoch being trained: continue it
    assert list(mid) == passes[1][5:] and list(mid) == passes[2]
    done = EpochShuffleSampler(12, seed=3, first_pass=2)
    done.load_state_dict({"epoch": 1, "yielded": 5})  # an epoch the trainer finished: replayed empty
    assert list(done) == [] and list(done) == passes[2]
