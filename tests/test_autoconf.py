"""Settings that follow the data (auto) and the config checks run before any job."""

import pandas as pd
import pytest
import torch
import yaml

from hybrid.autoconf import ConfigError, check_config, discriminator_sizes, resolve_auto, schema_errors
from hybrid.models.discriminator import MultiscaleDiscriminator
from tests.stage_data import REPO_CONFIG

SCHEMA = yaml.safe_load((REPO_CONFIG.parent / "schema.yaml").read_text())


def default_config(layout: str, **sections) -> dict:
    cfg = yaml.safe_load(REPO_CONFIG.read_text())
    cfg["dataset"] = {"layout": layout, "options": {"root": "/data"} if layout != "demo" else {}}
    for k, v in sections.items():
        cfg[k].update(v)
    return cfg


def test_auto_follows_the_layout_and_what_is_installed(model_dir):
    demo, notes = resolve_auto(default_config("demo"))
    assert demo["preprocess"]["edge_model"] == "canny" and demo["preprocess"]["depth_source"] == "dataset"
    assert demo["model"]["conditions"] == ["reference_image", "target_depth", "target_edge"]
    assert demo["model"]["decoders"] == ["AHD", "AHE"] and demo["generate"]["global"]["pairing"] == "groups"
    assert demo["generate"]["local"]["source"] == "select"
    assert any("canny (no PiDiNet weights here" in n for n in notes)

    mvtec, notes = resolve_auto(default_config("mvtec_ad"))  # no depth of its own, no weights: AHE only
    assert mvtec["preprocess"]["depth_source"] == "none" and mvtec["model"]["decoders"] == ["AHE"]
    assert mvtec["model"]["conditions"] == ["reference_image", "target_edge"]
    assert mvtec["generate"]["global"]["pairing"] == "random" and mvtec["generate"]["local"]["source"] == "base"
    assert any("AHD, which follows depth, is left out" in n for n in notes)
    assert resolve_auto(default_config("mvtec_3d"))[0]["preprocess"]["depth_source"] == "sensor"

    (model_dir / "pidinet").mkdir()
    (model_dir / "pidinet" / "table5_pidinet.pth").write_bytes(b"x")
    (model_dir / "depth_anything" / "Depth-Anything-V2-Small-hf").mkdir(parents=True)
    (model_dir / "depth_anything" / "Depth-Anything-V2-Small-hf" / "config.json").write_text("{}")
    visa, _ = resolve_auto(default_config("visa"))
    assert visa["preprocess"]["edge_model"] == "pidinet"
    assert visa["preprocess"]["depth_source"] == "depth_anything_small"
    assert visa["model"]["decoders"] == ["AHD", "AHE"]
    explicit, notes = resolve_auto(default_config("visa", preprocess={"edge_model": "canny", "depth_source": "none"}))
    assert explicit["preprocess"]["edge_model"] == "canny" and not any(n.startswith("preprocess") for n in notes)


@pytest.mark.parametrize("size,n_layers,num_D", [(32, 3, 2), (16, 3, 5), (8, 3, 2), (2, 2, 2), (24, 3, 3), (1, 3, 1)])
def test_discriminator_sizes_predict_what_the_network_can_train_on(size, n_layers, num_D):
    D = MultiscaleDiscriminator(4, ndf=2, n_layers=n_layers, num_D=num_D).train()
    predicted = discriminator_sizes(size, n_layers, num_D)
    try:
        feats = D(torch.zeros(1, 4, size, size))
        ok = True
    except ValueError:  # InstanceNorm: "Expected more than 1 spatial element when training"
        ok = False
    assert ok == all(s >= 2 for scale in predicted for s in scale)
    if ok:  # the normalised layers (all but the first and the last) have the predicted sizes
        assert [[f.shape[-1] for f in scale[1:-1]] for scale in feats] == predicted


def test_every_broken_rule_is_named_before_any_job(tmp_path, monkeypatch, model_dir):
    cfg, _ = resolve_auto(default_config("demo"))
    cfg["preprocess"]["resolution"] = 36
    cfg["train"].update(epochs=0, epochs_decay=0)
    cfg["model"]["conditions"] = ["reference_image", "target_depth", "target_edge"]
    cfg["preprocess"]["depth_source"] = "none"
    cfg["train_depth"].update(enabled=True, epochs=0, epochs_decay=0)
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    text = str(e.value)
    for part in ("preprocess.resolution 36 does not suit model.n_downsample 3", "train.epochs + train.epochs_decay",
                 "model.conditions has target_depth, but preprocess.depth_source is none",
                 "train_depth.enabled needs depth and edges", "train_depth.epochs + train_depth.epochs_decay"):
        assert part in text
    small, _ = resolve_auto(default_config("demo", preprocess={"resolution": 16}, model={"n_downsample": 2},
                                           train={"num_D": 5}))
    with pytest.raises(ConfigError, match="train.num_D 5 / train.n_layers_D 3 are too deep"):
        check_config(small)
    offline, _ = resolve_auto(default_config("demo", preprocess={"edge_model": "pidinet"}))
    with pytest.raises(ConfigError, match="hybrid models fetch pidinet"):
        check_config(offline)  # model_dir sets HYBRID_OFFLINE and holds no weights


def test_filters_are_checked_against_an_existing_manifest_of_this_layout(tmp_path):
    rows = pd.DataFrame({"sample_id": ["a", "b"], "dataset": ["demo", "demo"], "split": ["train", "test"],
                         "label": [0, 1], "subspecies": ["8", "9"], "category": ["x", "x"]})
    rows.to_parquet(tmp_path / "manifest.parquet")
    cfg, _ = resolve_auto(default_config("demo", train={"select": {"split": "trian"}}))
    with pytest.raises(ConfigError, match=r"train.select \{'split': 'trian'\} matches none of the 2 rows"):
        check_config(cfg, tmp_path / "manifest.parquet")
    cfg["train"]["select"] = {"spilt": "train"}
    with pytest.raises(ConfigError, match="'spilt' is not a manifest column"):
        check_config(cfg, tmp_path / "manifest.parquet")
    rows.assign(dataset="mvtec_ad").to_parquet(tmp_path / "manifest.parquet")  # another dataset's: stale
    check_config(cfg, tmp_path / "manifest.parquet")


def test_schema_errors_are_one_line_each_with_the_allowed_values():
    cfg = default_config("demo")
    cfg["trian"] = {}
    cfg["preprocess"]["fit"] = "squash"
    cfg["evaluate"]["kinds"] = "some"
    lines = schema_errors(cfg, SCHEMA, "config/schema.yaml")
    assert len(lines) == 3 and all("(see config/schema.yaml)" in line for line in lines)
    assert "'trian' was unexpected" in lines[0] and "valid keys here are ['anomalyfactory', 'augment'" in lines[0]
    assert "evaluate.kinds: 'some' is not valid here (use 'auto' or an array)" in lines[1]
    assert "preprocess.fit: 'squash' is not one of ['stretch', 'crop', 'pad']" in lines[2]
