"""A ``torch.compile``d model under the engine: the masks and weights of the eager run, masked weights exactly 0.

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
