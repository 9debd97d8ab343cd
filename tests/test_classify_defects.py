"""The ResNet defect classifier of the industrial protocol (paper 003, Tables 5 and 7)."""

import json

import numpy as np
import pandas as pd
import pytest

from hybrid.data.manifest import make_manifest
from hybrid.data.shards import build_index, write_shard
from hybrid.stages.classify_defects import ClassifyDefectsConfig, run

pytestmark = pytest.mark.usefixtures("one_thread")
S = 32


def defect_image(rng: np.random.Generator, defect: str) -> np.ndarray:
    """Grey noise with a bright square (scratch) or a dark disc (hole) somewhere."""
    img = rng.integers(90, 140, (S, S, 3)).astype(np.uint8)
    y, x = rng.integers(4, S - 12, 2)
    if defect == "scratch":
        img[y:y + 8, x:x + 8] = 250
    elif defect == "hole":
        yy, xx = np.mgrid[0:S, 0:S]
        img[(yy - y - 4) ** 2 + (xx - x - 4) ** 2 <= 16] = 10
    else:
        img[y:y + 8, x:x + 8, 0] = 255
    return img


def make_data(root, defects=("scratch", "hole"), per_defect=12, eval_defects=None):
    rng = np.random.default_rng(0)
    rows, images, ids = [], [], []
    for c in ("bottle", "pill"):
        for d in eval_defects or defects:
            for i in range(4):
                sid = f"{c}/test/{d}/{i:03d}"
                rows.append({"sample_id": sid, "dataset": "t", "category": c, "split": "test", "label": 1,
                             "defect": d, "image_path": f"/x/{sid}.png"})
                images.append(defect_image(rng, d))
                ids.append(sid)
    manifest = make_manifest(rows, "t").assign(protocol="eval")
    (root / "shards").mkdir()
    write_shard(root / "shards" / "shard-00000.h5", {"image": np.stack(images)}, {"sample_id": ids}, {})
    build_index([root / "shards" / "shard-00000.h5"]).to_parquet(root / "shards" / "index.parquet")
    grow, gimages = [], []
    for c in ("bottle", "pill"):
        for d in defects:
            for i in range(per_defect):
                for dec in ("AHD", "AHE"):
                    grow.append({"sample_id": f"local-{c}-{d}-{i}-{dec}", "decoder": dec, "category": c, "defect": d,
                                 "kind": "local", "manipulation": ("merge", "remove")[i % 2]})
                    gimages.append(defect_image(rng, d))
    gen = pd.DataFrame(grow)
    (root / "generated").mkdir()
    write_shard(root / "generated" / "shard-00000.h5", {"image": np.stack(gimages)},
                {"sample_id": gen["sample_id"].tolist()}, {})
    gen = gen.assign(shard="shard-00000.h5", index=np.arange(len(gen)))
    return gen, manifest


def cfg(**kw) -> ClassifyDefectsConfig:
    return ClassifyDefectsConfig.from_dict({"arch": "resnet18", "weights": "random", "epochs": 6, "lr": 1e-3,
                                            "batch_size": 16, "input_size": 32, "device": "cpu", **kw})


def test_resnet_trained_on_generated_defects_classifies_the_real_eval_anomalies(tmp_path, model_dir):
    gen, manifest = make_data(tmp_path)
    out = tmp_path / "metrics"
    run(gen, tmp_path / "generated", manifest, tmp_path / "shards" / "index.parquet", out,
        cfg(variants=["AHD", "both"], manipulations=["all", "merge"]))
    table = pd.read_parquet(out / "classify_defects.parquet")
    assert list(zip(table["category"], table["variant"], table["manipulation"])) == [
        (c, v, m) for c in ("bottle", "pill", "(mean)") for v in ("AHD", "both") for m in ("all", "merge")]
    t = table.set_index(["category", "variant", "manipulation"])
    assert t.loc[("bottle", "AHD", "all"), "n_train"] == 24 and t.loc[("bottle", "both", "all"), "n_train"] == 48
    assert t.loc[("bottle", "AHD", "merge"), "n_train"] == 12 and t.loc[("bottle", "AHD", "all"), "n_test"] == 8
    assert t.loc[("bottle", "AHD", "all"), "classes"] == "hole, scratch"
    # bright squares vs dark discs: learnable even from a random-weight backbone
    assert t.loc[("(mean)", "both", "all"), "accuracy"] >= 0.8
    assert (table["weights"].dropna().str.startswith("random stand-in")).all()
    doc = json.loads((out / "classify_defects.json").read_text())
    assert doc["skipped"] == [] and len(doc["rows"]) == len(table)


def test_unseen_defect_types_and_single_type_categories_are_reported_never_dropped(tmp_path, model_dir):
    gen, manifest = make_data(tmp_path, defects=("scratch", "hole"), per_defect=2,
                              eval_defects=("scratch", "hole", "tint"))
    gen.loc[(gen["category"] == "pill") & (gen["defect"] == "hole"), "defect"] = "scratch"  # pill: one type
    result = run(gen, tmp_path / "generated", manifest, tmp_path / "shards" / "index.parquet", tmp_path / "m",
                 cfg(epochs=1, variants=["both"]))
    reasons = {(s["category"], s["reason"].split(":")[0]) for s in result["skipped"]}
    assert ("bottle", "eval defect types never generated, counted as errors") in reasons
    pill = [r for r in result["rows"] if r["category"] == "pill"]
    assert len(pill) == 1 and pill[0]["accuracy"] is None and "classification needs 2" in pill[0]["note"]
    bottle = next(r for r in result["rows"] if r["category"] == "bottle")
    assert bottle["n_test"] == 12 and bottle["accuracy"] <= 8 / 12  # the 4 tints can never be right
    mean = next(r for r in result["rows"] if r["category"] == "(mean)")
    assert "mean over 1 of 2 categories" in mean["note"]


def test_config_errors_and_missing_defect_labels():
    with pytest.raises(ValueError, match="classify_defects.variants"):
        ClassifyDefectsConfig.from_dict({"variants": ["AHX"]})
    with pytest.raises(ValueError, match="unknown classify_defects config key"):
        ClassifyDefectsConfig.from_dict({"epoch": 3})
    gen = pd.DataFrame({"kind": ["local"], "defect": [None], "category": ["a"]})
    with pytest.raises(ValueError, match="generate.local.source: base"):
        run(gen, ".", make_manifest([], "t"), _empty_index(), ".", cfg())


def _empty_index():
    import tempfile
    from pathlib import Path

    p = Path(tempfile.mkdtemp()) / "index.parquet"
    pd.DataFrame({"sample_id": [], "shard": [], "index": []}).to_parquet(p)
    return p
