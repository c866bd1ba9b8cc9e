"""Every member on 42 timm architectures at s=0.75: it works, or it refuses by name. Never a crash,
never a silent change (see ``sift_lightning.transforms.coverage`` for what "works" checks)."""

import pytest
import torch

from sift_lightning.transforms.coverage import TIMM_MODELS, check_timm
from transform_models import MEMBERS

pytest.importorskip("timm")

# CNNs whose convs feed norms: Sparse Parallel must give those branches norms of their own
CONV_NORM_CNNS = {
    "resnet18", "resnet50", "seresnet18", "resnext26ts", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv2_035",
    "mobilenetv3_small_050", "mixnet_s", "ghostnet_050", "rexnet_100", "regnetx_002", "regnety_002", "densenet121",
    "dla34", "cs3darknet_focus_s", "repvgg_a0", "mobileone_s0", "hrnet_w18_small", "inception_v3", "xception41",
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_list_spans_enough_architectures():
    assert len(TIMM_MODELS) >= 40
    assert len({c.name for c in TIMM_MODELS}) == len(TIMM_MODELS)
    assert CONV_NORM_CNNS <= {c.name for c in TIMM_MODELS}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("case", TIMM_MODELS, ids=lambda c: c.name)
def test_member_works_or_refuses_by_name(case, member):
    outcome = check_timm(case, member, 0.75)
    assert outcome.status in ("works", "refuses"), f"{case.name} / {member}: {outcome.detail}"
    if outcome.status == "refuses":
        # one line, saying which member and why, with a way out
        assert "\n" not in outcome.detail and outcome.detail
        assert member in outcome.detail or "budget" in outcome.detail, outcome.detail
    else:
        assert abs(outcome.mac_ratio - 1.0) <= 0.02  # iso-FLOP by default (match_flops when it would miss)
    if member == "sparse_parallel" and case.name in CONV_NORM_CNNS:
        assert outcome.status == "works", outcome.detail
        with_norm, fed = outcome.branch_norms
        assert fed > 0 and with_norm >= fed, f"{case.name}: {with_norm} of {fed} norm-fed convs have branch norms"
