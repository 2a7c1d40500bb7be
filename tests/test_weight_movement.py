"""bench.weight_movement's choice of the modules a DP fine-tune trains: grouping, ranking and the share rule."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed
from bench.weight_movement import choose, module_of, movement  # noqa: E402


def test_parameters_are_grouped_by_block_sub_layer_or_top_module():
    assert module_of("blocks.1.cross_attn.q.weight") == "blocks.1.cross_attn"
    assert module_of("layers.0.mlp.fc1.bias") == "layers.0.mlp"
    assert module_of("final_layer.linear.weight") == "final_layer"
    assert module_of("null_base.token") == "null_base"


def test_the_densest_modules_are_chosen_until_they_hold_the_share():
    rng = np.random.default_rng(0)
    before = {"blocks.0.attn.q.weight": rng.normal(size=(8, 8)), "blocks.0.mlp.fc1.weight": rng.normal(size=(64, 8)),
              "final_layer.linear.weight": rng.normal(size=(4, 8))}
    after = {k: v.copy() for k, v in before.items()}
    after["final_layer.linear.weight"] += 1.0  # 32 parameters, squared change 32: the densest
    after["blocks.0.mlp.fc1.weight"][:, 0] += 2.0  # 512 parameters, squared change 256: the largest
    after["blocks.0.attn.q.weight"] += 0.1  # 64 parameters, squared change 0.64
    rows = movement(before, after)
    assert [r["module"] for r in rows] == ["final_layer", "blocks.0.mlp", "blocks.0.attn"]
    assert abs(sum(r["share"] for r in rows) - 1.0) < 1e-9
    assert abs(rows[1]["squared_change"] - 256.0) < 1e-6 and rows[1]["parameters"] == 512
    assert choose(rows, 0.1) == ["final_layer"]  # 32 / 288.64 = 0.11 already
    assert choose(rows, 0.5) == ["final_layer", "blocks.0.mlp"]
    assert choose(rows, 1.0) == ["final_layer", "blocks.0.mlp", "blocks.0.attn"]
