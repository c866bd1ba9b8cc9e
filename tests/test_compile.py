"""torch.compile and optimizer wrappers under the engine: the masks and weights of the plain eager run.

The engine works on parameters, gradients and optimizer hooks, outside the compiled forward; these
tests hold that compiling the model (after ``apply``, as the README says) changes nothing.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sift_lightning import DynamicSparsity, SparsitySettings
from sift_lightning.sparse.masks import get_mask, sparse_parameters

STEPS = 6


def _run(member: str | None, backend: str | None) -> tuple[nn.Module, DynamicSparsity]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    engine = DynamicSparsity(SparsitySettings(sparsity=0.75, transform=member, algorithm="rigl", update_frequency=2))
    model = engine.apply(model)
    forward = torch.compile(model, backend=backend) if backend else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine.attach(opt, total_steps=STEPS)
    data = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(16, 8, generator=data), torch.randint(0, 4, (16,), generator=data)
        F.cross_entropy(forward(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, engine


_BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler"))]


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("member", [None, "sparse_doped", "sparse_factorized"])
def test_compiled_model_trains_like_eager(member, backend):
    eager, eager_engine = _run(member, None)
    compiled, engine = _run(member, backend)
    assert engine.updates == eager_engine.updates == 2  # steps 2 and 4 (end=0.75 of 6 steps)
    expected = eager.state_dict()
    for name, value in compiled.state_dict().items():
        if name.endswith("_sift_mask"):
            assert torch.equal(value, expected[name]), name  # the same RigL choices
        else:
            torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5, msg=name)
    for full, owner, local, param in sparse_parameters(compiled):
        assert not param[~get_mask(owner, local)].any(), full


# ---------------------------------------------------------------- optimizer wrappers
class _Wrapped(torch.optim.Optimizer):
    """Like accelerate's AcceleratedOptimizer: an Optimizer subclass that never ran Optimizer.__init__
    and whose step() calls the inner optimizer's."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # noqa: D107 - no super().__init__, on purpose
        self.optimizer = optimizer

    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    def step(self, closure=None):  # type: ignore[override]
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)


def test_a_wrapped_optimizer_is_attached_through_its_inner_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    engine = DynamicSparsity(SparsitySettings(sparsity=0.75, algorithm="rigl", update_frequency=2))
    engine.apply(model)
    opt = _Wrapped(torch.optim.AdamW(model.parameters(), lr=1e-2))
    engine.attach(opt, total_steps=6)
    for _ in range(6):
        F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 2, (16,))).backward()
        opt.step()
        opt.zero_grad()
    assert engine.steps == [6] and engine.updates == 2
    for full, owner, local, param in sparse_parameters(model):
        assert not param[~get_mask(owner, local)].any(), full
    with pytest.raises(ValueError, match="this optimizer is attached already"):
        engine.attach(opt.optimizer, total_steps=6)  # the wrapper and its optimizer are one optimizer


def test_attach_refuses_what_is_not_an_optimizer():
    engine = DynamicSparsity(SparsitySettings(sparsity=0.5))
    model = engine.apply(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)))
    sched = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), 1)
    with pytest.raises(ValueError, match="attach needs a torch.optim.Optimizer .*got StepLR"):
        engine.attach(sched, total_steps=4)


def test_accelerate_prepared_optimizer():
    # Hugging Face accelerate: attach the optimizer prepare() returns (or the raw one before it)
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    engine = DynamicSparsity(SparsitySettings(sparsity=0.75, algorithm="rigl", update_frequency=2))
    engine.apply(model)
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    engine.attach(opt, total_steps=6)
    for _ in range(6):
        accelerator.backward(F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 2, (16,))))
        opt.step()
        opt.zero_grad()
    assert engine.steps == [6] and engine.updates == 2
    for full, owner, local, param in sparse_parameters(model):
        assert not param[~get_mask(owner, local)].any(), full
