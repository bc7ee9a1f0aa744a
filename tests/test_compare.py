"""`avel compare`: localizers (and ablation variants) on the same features, one table (tiny models, CPU)."""

import json

import pytest

from pipeline.ave import compare as cmp
from pipeline.ave.features import from_public_folder
from pipeline.ave.train import TrainConfig
from pipeline.errors import UserError
from tests.features_fixture import TINY_MODEL, write_feature_folder

TINY_AVECLIP = {"d_model": 16, "num_heads": 2, "feature_heads": 2, "ff_mult": 2}


def test_variants_parse_and_validate_before_any_run():
    v = cmp.parse_variant("aveclip:multiscale=staged:postprocess.enabled=false")
    assert (v.model, v.overrides) == ("aveclip", ["multiscale=staged", "postprocess.enabled=false"])
    base = TrainConfig(model="cace", model_args=TINY_MODEL, device="cpu")
    cfg = cmp.variant_config(base, v, seed=2)
    assert cfg.model == "aveclip" and cfg.seed == 2 and cfg.model_args == {"multiscale": "staged",
                                                                           "postprocess": {"enabled": False}}
    assert cmp.variant_config(base, cmp.parse_variant("cace"), 1).model_args == TINY_MODEL  # base's args, own model
    with pytest.raises(UserError, match="model 'aveclip:windows=3'.*unknown aveclip model field"):
        cmp.variant_config(base, cmp.parse_variant("aveclip:windows=3"), 1)


def test_two_models_three_seeds_make_one_table(tmp_path):
    fs = from_public_folder(write_feature_folder(tmp_path / "feats"))
    base = TrainConfig(epochs=2, batch_size=4, lr=3e-3, milestones=[100], device="cpu", precision="fp32",
                       model="aveclip", model_args=TINY_AVECLIP)
    seen = []
    rows = cmp.compare(fs, base, ["aveclip", "aveclip:decision=event_head"], [1, 2, 3], tmp_path / "store",
                       on_run=lambda name, seed: seen.append((name, seed)))
    assert seen == [("aveclip", 1), ("aveclip", 2), ("aveclip", 3), ("aveclip:decision=event_head", 1),
                    ("aveclip:decision=event_head", 2), ("aveclip:decision=event_head", 3)]
    assert len({r.dir for row in rows for r in row.runs}) == 6  # six distinct train runs in the store
    md, js = cmp.write_report(rows, tmp_path / "report", ["RANDOM WEIGHTS: test"])
    table = md.read_text()
    assert "| aveclip:decision=event_head |" in table and "RANDOM WEIGHTS" in table
    data = json.loads(js.read_text())
    acc = data["rows"][0]["test_accuracy"]
    assert len(acc["values"]) == 3 and acc["mean"] == pytest.approx(sum(acc["values"]) / 3)
    again = cmp.compare(fs, base, ["aveclip"], [1], tmp_path / "store")  # cached in the store
    assert again[0].runs[0].reused
