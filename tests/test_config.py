from pathlib import Path

import pytest

from ecgtwin.config import ConfigError, ExperimentConfig, load_config, save_config, to_dict
from ecgtwin.models import paper_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_load_and_round_trip(tmp_path):
    for name in ("demo", "paper"):
        config = load_config(CONFIGS / f"{name}.yaml")
        save_config(config, tmp_path / "again.yaml")
        assert load_config(tmp_path / "again.yaml") == config
    assert to_dict(load_config(CONFIGS / "paper.yaml").model) == to_dict(paper_config())


@pytest.mark.parametrize("text,message", [
    ("vae:\n  stepz: 3\n", "vae.stepz: unknown key"),
    ("vae:\n  steps: many\n", "vae.steps: expected int, got 'many'"),
    ("twin:\n  lr: -1\n", "twin.lr: must be > 0"),
    ("twin:\n  cond_dropout: 1.5\n", "twin.cond_dropout: must be in [0, 1)"),
    ("generate:\n  sampler: euler\n", "generate.sampler: must be one of"),
    ("model:\n  dit:\n    injector: film\n", "model.dit.injector: must be one of"),
    ("model:\n  ibe:\n    base_dim: 32\n", "model: IBE base vector"),
    ("vae: [1, 2]\n", "vae: expected a mapping"),
    ("twin:\n  trainable: modules\n", "twin: trainable: modules needs trainable_modules"),
    ("twin:\n  trainable_modules: [final_layer]\n", "twin: trainable_modules is only read by trainable: modules"),
    ("vae: {steps: 3\n", "not valid YAML"),
])
def test_bad_configs_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_defaults_are_the_paper_sizes():
    assert to_dict(ExperimentConfig().model) == to_dict(paper_config())


def test_a_config_names_a_base_file_and_holds_only_what_differs(tmp_path):
    """demo-foundation.yaml is demo.yaml with longer training: the file says `base: demo.yaml` and the
    differences only; mappings merge key by key, and a missing base or a cycle is refused naming the file."""
    foundation, demo = load_config(CONFIGS / "demo-foundation.yaml"), load_config(CONFIGS / "demo.yaml")
    assert foundation.model == demo.model and foundation.generate == demo.generate
    assert (foundation.name, foundation.twin.steps, foundation.twin.lr) == ("demo-foundation", 4000, demo.twin.lr)
    lines = (CONFIGS / "demo-foundation.yaml").read_text().splitlines()
    assert "base: demo.yaml" in lines and len(lines) < 20
    (tmp_path / "child.yaml").write_text(f"base: {CONFIGS / 'demo.yaml'}\nvae:\n  steps: 7\n")
    assert load_config(tmp_path / "child.yaml").vae.steps == 7
    assert load_config(tmp_path / "child.yaml").vae.lr == demo.vae.lr
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: base file of .*orphan.yaml does not exist"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text(f"base: {CONFIGS / 'demo.yaml'}\nvae:\n  stepz: 7\n")
    with pytest.raises(ConfigError, match="bad.yaml: vae.stepz: unknown key"):
        load_config(tmp_path / "bad.yaml")


def test_a_module_name_the_model_lacks_is_a_clear_error(tmp_path):
    from ecgtwin.errors import UserError
    from ecgtwin.weights import trainable_names

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    config.twin.trainable, config.twin.trainable_modules = "modules", ["final_layer", "blocks.9.attn"]
    with pytest.raises(UserError, match="twin.trainable_modules: 'blocks.9.attn' names no parameter of AdaXDenoiser"):
        trainable_names("twin", config)
    config.twin.trainable_modules = ["final_layer", "blocks.1"]  # a prefix: every parameter under it
    names = trainable_names("twin", config)
    assert names and all(n.startswith(("final_layer.", "blocks.1.")) for n in names)
    assert any(n.startswith("blocks.1.mlp.") for n in names) and not any(n.startswith("blocks.10") for n in names)
