"""mcore/optim_layout.py: the optimizer's common checkpoint part rewritten between expert layouts.

The saved structures are megatron-core 0.16.1's, as written by tests/distributed/test_moe_resume_ep.py (plain
optimizer: {'state': {'common_step'}, 'param_groups'}; distributed: {'optimizer': {'param_groups'},
'param_state_sharding_type'}; a chain of two: {0: dense, 1: expert}). The end-to-end resume is tested there.
"""
from __future__ import annotations

import copy

import pytest
import torch

from megatron_gift.mcore.optim_layout import OptimizerLayoutError, remap_optimizer_common


def _group(expert: bool, wd_mult: float = 1.0, **extra):
    return {"is_expert_parallel": expert, "default_config": True, "wd_mult": wd_mult, "lr_mult": 1.0,
            "is_decoupled_lr": False, "max_lr": 1e-3, "min_lr": 0.0, "lr": 8e-4, "betas": (0.9, 0.999),
            "eps": 1e-8, "weight_decay": 0.0, **extra}


def _plain(groups, step=2.0):
    return {"state": {"common_step": torch.tensor(step)}, "param_groups": groups}


def _distributed(groups):
    return {"optimizer": {"param_groups": groups}, "param_state_sharding_type": "fully_reshardable"}


EP2 = [[_group(False), _group(False, 0.0)], [_group(True)]]  # current torch param groups per chained optimizer
EP1 = [[_group(False), _group(False, 0.0)]]


def test_an_ep2_chain_becomes_one_optimizer_and_back():
    saved = {0: _plain([_group(False), _group(False, 0.0)]), 1: _plain([_group(True)])}
    one = remap_optimizer_common(copy.deepcopy(saved), EP1)
    assert set(one) == {"state", "param_groups"} and float(one["state"]["common_step"]) == 2.0
    assert [(g["wd_mult"], g["is_expert_parallel"], g["lr"]) for g in one["param_groups"]] == [(1.0, False, 8e-4),
                                                                                               (0.0, False, 8e-4)]
    two = remap_optimizer_common(one, EP2)
    assert set(two) == {0, 1} and two[1]["param_groups"] == [_group(True)]
    assert all(_equal_plain(two[i], saved[i]) for i in (0, 1))


def _equal_plain(a, b):
    return a["param_groups"] == b["param_groups"] and torch.equal(a["state"]["common_step"], b["state"]["common_step"])


def test_distributed_optimizer_groups_keep_their_step():
    saved = {0: _distributed([_group(False, step=2.0), _group(False, 0.0, step=2.0)]),
             1: _distributed([_group(True, step=2.0)])}
    one = remap_optimizer_common(saved, EP1)
    assert one["param_state_sharding_type"] == "fully_reshardable"
    assert [g["step"] for g in one["optimizer"]["param_groups"]] == [2.0, 2.0]
    assert remap_optimizer_common(one, EP2)[1]["optimizer"]["param_groups"] == [_group(True, step=2.0)]


def test_the_same_layout_is_left_as_saved():
    saved = {0: _plain(EP2[0]), 1: _plain(EP2[1])}
    assert remap_optimizer_common(saved, EP2) is saved


def test_what_cannot_be_merged_is_refused_naming_it():
    other_lr = {0: _plain([_group(False), _group(False, 0.0)]), 1: _plain([_group(True, lr=1e-4)])}
    with pytest.raises(OptimizerLayoutError, match=r"differ in \['lr'\]"):
        remap_optimizer_common(other_lr, EP1)
    other_step = {0: _plain([_group(False), _group(False, 0.0)]), 1: _plain([_group(True)], step=3.0)}
    with pytest.raises(OptimizerLayoutError, match=r"optimizer state \['state'\] differs"):
        remap_optimizer_common(other_step, EP1)
    no_bias_group = {0: _plain([_group(False)]), 1: _plain([_group(True)])}
    with pytest.raises(OptimizerLayoutError, match="no optimizer param group .'wd_mult': 0.0"):
        remap_optimizer_common(no_bias_group, EP1)
