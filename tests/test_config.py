from pathlib import Path

import pytest

from exits.config import ConfigError, ExitsConfig, dump_config, load_config
from exits.config.loading import CONFIG_DIR, apply_overrides, parse_override


@pytest.mark.parametrize("name", ["demo", "coco", "lvis", "voc"])
def test_shipped_configs_validate(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.backbone.img_size % cfg.backbone.patch_size == 0
    assert (CONFIG_DIR / f"{name}.yaml").exists()


def test_paper_configs_are_vit_b16_at_512():
    for name in ("coco", "lvis", "voc"):
        b = load_config(name).backbone
        assert (b.vit_name, b.img_size, b.patch_size, b.grid) == ("vit_base_patch16_224", 512, 16, 32)


def test_overrides_are_typed_and_nested():
    cfg = load_config("demo", ["generator.optim.epochs=3", "device=cpu", "retrieval.layers=[-1, -2]",
                               "backbone.pretrained_path=null"])
    assert cfg.generator.optim.epochs == 3 and cfg.device == "cpu" and cfg.retrieval.layers == [-1, -2]
    assert parse_override("a.b=1.5") == (["a", "b"], 1.5)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize("override, key", [
    ("generator.optim.epochs=0", "generator.optim.epochs"),
    ("backbone.img_size=100", "backbone"),
    ("retrieval.tau_bg=0.5", "retrieval"),
    ("generator.typo=1", "generator.typo"),
    ("device=tpu", "device"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo", [override])


def test_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="bad.yaml: top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must look like"):
        load_config(None, ["no_equals_sign"])


def test_dump_round_trips(tmp_path: Path):
    cfg = load_config("demo", ["seed=7"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert ExitsConfig() == load_config(None)


@pytest.mark.parametrize("old, new", [("similarity.layers=[-1]", "retrieval.layers"),
                                      ("similarity.appearance_weight=0.3", "retrieval.appearance_weight")])
def test_moved_keys_name_their_new_place(old, new):
    with pytest.raises(ConfigError, match=new.replace(".", r"\.")):
        load_config("demo", [old])


def test_paper_configs_refuse_a_random_init_backbone_before_training(tmp_path):
    """coco/lvis/voc without pretrained weights stop before training with one line saying what
    is missing and the two ways on; the demo (random init on purpose) and an explicit
    allow_random_init or a checkpoint path pass."""
    from exits.config import ConfigError, load_config
    from exits.pipeline import stage_similarity
    from exits.stages.common import require_backbone_weights

    for name in ("coco", "lvis", "voc"):
        cfg = load_config(name, [])
        refusal = cfg.backbone.random_init_refusal()
        assert refusal is not None and "\n" not in refusal
        assert "backbone.pretrained_path=" in refusal and "backbone.allow_random_init=true" in refusal
        with pytest.raises(ConfigError, match="pretrained_path"):
            require_backbone_weights(cfg.backbone)
        with pytest.raises(ConfigError, match="pretrained_path"):  # before any crop is read
            stage_similarity(cfg, None, None, "cpu", progress=False)
        assert load_config(name, ["backbone.allow_random_init=true"]).backbone.random_init_refusal() is None
        assert load_config(name, ["backbone.pretrained_path=/models/vit_b16.pth"]).backbone.random_init_refusal() is None
    assert load_config("demo", []).backbone.random_init_refusal() is None
