"""The held-out demo variant: other photographs in every role, same generator."""
import json

from exits.demo import generate_demo_dataset
from exits.demo import sources


def test_holdout_variant_uses_other_photographs_in_every_role() -> None:
    demo, hold = sources.DEMO_SOURCES, sources.HOLDOUT_SOURCES
    assert not set(hold.categories) & set(demo.categories)
    assert not set(hold.backgrounds) & set(demo.backgrounds)
    assert not set(hold.occluders) & set(demo.occluders)
    roles = [set(hold.categories), set(hold.backgrounds), set(hold.occluders)]
    assert sum(map(len, roles)) == len(set().union(*roles))  # one role per photograph
    for name in hold.categories + hold.backgrounds + hold.occluders:
        assert sources.load_source(name).shape[2] == 3


def test_holdout_variant_generates_labelled_images(tmp_path) -> None:
    summary = generate_demo_dataset(tmp_path / "h", n_train=4, n_val=0, seed=1, variant="holdout")
    data = json.loads((tmp_path / "h" / "instances.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(sources.HOLDOUT_SOURCES.categories)
    assert data["info"]["variant"] == "holdout"
    assert summary["train"]["objects"] == len(data["annotations"]) > 0
    other = generate_demo_dataset(tmp_path / "d", n_train=4, n_val=0, seed=1)
    assert (tmp_path / "h" / "images" / "train_000001.jpg").read_bytes() != (tmp_path / "d" / "images" / "train_000001.jpg").read_bytes()
    assert other["train"]["objects"] > 0
