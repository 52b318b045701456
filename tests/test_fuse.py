"""Figure-2 fusion heads: shared weights are one parameter, fused logits are the sum of the heads'."""
from __future__ import annotations

import pytest
import numpy as np
import torch

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.heads import FusionHeads

DIMS = {"title_cam": 12, "desc_cam": 8, "image": 4, "title_bpe": 6}


def sketches(batch: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {m: torch.rand(batch, d, generator=g) for m, d in DIMS.items()}


def test_paper_heads_share_the_title_weights():
    heads = [h.model_dump() for h in load_config("configs/default.toml").fusion.heads]
    model = FusionHeads(heads, DIMS, num_classes=27)
    assert sorted(model.linears) == ["concat", "title"]  # three heads, two sets of weights
    params = list(model.parameters())
    assert len(params) == 4  # two weights, two biases: the doubled title head is one parameter
    assert model.linears["concat"].in_features == 8 + 4 + 6
    x = sketches()
    per_head = model.head_logits(x)
    assert len(per_head) == 3 and torch.equal(per_head[1], per_head[2])
    torch.testing.assert_close(model(x), per_head[0] + per_head[1] + per_head[2])
    torch.testing.assert_close(model(x), per_head[0] + 2 * model.linears["title"](x["title_cam"]))


def test_a_gradient_step_moves_the_shared_head_once():
    heads = [h.model_dump() for h in load_config("configs/default.toml").fusion.heads]
    model = FusionHeads(heads, DIMS, num_classes=3)
    model(sketches()).sum().backward()
    # The doubled head's gradient is twice a single head's: both uses land on the same tensor.
    single = FusionHeads([{"name": "t", "inputs": ["title_cam"]}], DIMS, num_classes=3)
    single.linears["t"].load_state_dict(model.linears["title"].state_dict())
    single(sketches()).sum().backward()
    torch.testing.assert_close(model.linears["title"].weight.grad, 2 * single.linears["t"].weight.grad)


@pytest.mark.parametrize("config, names", [("configs/fusion-concat-all.toml", ["all"]),
                                           ("configs/fusion-single-title.toml", ["concat", "title"])])
def test_ablation_configs_are_runs_of_the_same_code(config, names):
    cfg = load_config(["configs/default.toml", config])
    model = FusionHeads([h.model_dump() for h in cfg.fusion.heads], DIMS, num_classes=27)
    assert sorted(model.linears) == names and len(model.head_logits(sketches())) == len(names)


def test_one_name_for_heads_of_different_sizes_is_refused():
    with pytest.raises(PipelineError, match="two heads named 'x'"):
        FusionHeads([{"name": "x", "inputs": ["image"]}, {"name": "x", "inputs": ["title_cam"]}], DIMS, 3)


def test_the_confusion_picture_shows_the_classes_most_confused_with_each_other():
    from pipeline.metrics import most_confused

    codes = [10, 20, 30, 40, 50, 60]
    labels = np.array([0] * 10 + [1] * 10 + [2] * 10 + [3] * 10 + [4] * 10 + [5] * 10)
    preds = labels.copy()
    preds[[20, 21, 22]] = 3  # class 30 read as 40 three times,
    preds[[30]] = 2  # 40 as 30 once,
    preds[[40, 41]] = 5  # 50 as 60 twice; classes 10 and 20 never wrong (their F1 ties at 1.0)
    names, matrix = most_confused(labels, preds, codes, 4)
    assert names == [30, 40, 50, 60]
    assert matrix.tolist() == [[7, 3, 0, 0], [1, 9, 0, 0], [0, 0, 8, 2], [0, 0, 0, 10]]
    assert most_confused(labels, labels, codes, 4)[0] == []  # no mistake: nothing to show
