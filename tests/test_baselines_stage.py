"""The baselines stage: Perlin / CutPaste anomalies written as the generate stage writes its outputs."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from hybrid.data.manifest import make_manifest
from hybrid.data.shards import ShardDataset, build_index, write_shard
from hybrid.io import write_parquet_atomic
from hybrid.stages.baselines import BaselinesConfig, concat_generated, run
from hybrid.stages.generate import MANIFEST_COLUMNS, read_generated

S = 32


def toy_image(rng: np.random.Generator, size: int = S) -> np.ndarray:
    """A smooth colour texture (bicubic-upsampled 4x4 noise) around mid-grey, uint8 RGB."""
    import cv2

    small = rng.uniform(60, 160, (4, 4, 3)).astype(np.float32)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def make_industrial(root, categories=("bottle", "nut"), n_train: int = 6, n_good: int = 3, n_bad: int = 3,
                    size: int = S, per_shard: int = 7, seed: int = 0, dataset: str = "toy") -> dict:
    """results/manifest.parquet and results/shards/ of an MVTec-like toy: per category ``n_train``
    normal training images, ``n_good`` normal and ``n_bad`` anomalous test images (a bright square,
    its mask stored), with edge and depth maps as preprocess stores them."""
    import cv2

    rng = np.random.default_rng(seed)
    rows, images, masks, has = [], [], [], []
    for c in categories:
        for split, defect, n in (("train", "good", n_train), ("test", "good", n_good), ("test", "crack", n_bad)):
            for i in range(n):
                img, m = toy_image(rng, size), np.zeros((size, size), np.uint8)
                if defect != "good":
                    y, x = rng.integers(4, size - 12, 2)
                    img[y:y + 8, x:x + 8] = 250
                    m[y:y + 8, x:x + 8] = 255
                rows.append({"sample_id": f"toy/{c}/{split}/{defect}/{i:03d}", "dataset": dataset, "category": c,
                             "split": split, "label": int(defect != "good"), "defect": defect,
                             "image_path": f"/nowhere/{c}/{split}/{defect}/{i:03d}.png"})
                images.append(img)
                masks.append(m)
                has.append("1" if defect != "good" else "0")
    manifest = make_manifest(rows, "toy")
    images = np.stack(images)
    grey = images.mean(-1).astype(np.uint8)
    edge = np.stack([cv2.Canny(g, 50, 100) for g in grey])
    yy, xx = np.mgrid[0:size, 0:size]
    depth = np.broadcast_to((65535 * (1 - np.hypot(yy - size / 2, xx - size / 2) / size)).astype(np.uint16),
                            grey.shape).copy()
    out = root / "results" / "shards"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    ids = manifest["sample_id"].tolist()
    for k, lo in enumerate(range(0, len(ids), per_shard)):
        sl = slice(lo, lo + per_shard)
        p = out / f"shard-{k:05d}.h5"
        write_shard(p, {"image": images[sl], "edge": edge[sl], "depth": depth[sl], "mask": np.stack(masks)[sl]},
                    {"sample_id": ids[sl], "has_mask": has[sl]},
                    {"resolution": size, "fit": "stretch", "edge_model": "canny", "depth_source": "dataset"})
        paths.append(p)
    write_parquet_atomic(build_index(paths), out / "index.parquet")
    write_parquet_atomic(manifest, root / "results" / "manifest.parquet")
    return {"manifest": manifest, "index": out / "index.parquet", "images": dict(zip(ids, images))}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return make_industrial(root)


def shard_arrays(out_dir) -> dict[str, dict[str, np.ndarray]]:
    res = {}
    for p in sorted(out_dir.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            res[p.name] = {k: f[k][:] for k in f} | {"attrs": dict(f.attrs)}
    return res


def test_writes_the_generate_format_with_masks_equal_to_regions(toy, tmp_path):
    cfg = BaselinesConfig.from_dict({"count": 5, "shard_size": 4}, default_count=16)
    out = tmp_path / "baselines"
    result = run(toy["index"], toy["manifest"], out, cfg)
    shards = sorted(out.glob("shard-*.h5"))
    assert len(shards) == 5  # 2 categories x 5 sources x 2 methods = 20 images, 4 per shard (2 pairs)
    # The generate stage's reader takes the shards, and the stored manifest is its output.
    again = read_generated(shards)
    assert list(again.columns) == MANIFEST_COLUMNS
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), again)
    pd.testing.assert_frame_equal(result, again)
    assert set(result["kind"]) == {"local"} and (result["label"] == 1).all()
    assert result.groupby(["category", "decoder"]).size().to_dict() == {
        (c, m): 5 for c in ("bottle", "nut") for m in ("perlin", "cutpaste")}
    assert set(result["manipulation"]) == {"perlin/images", "cutpaste/normal"}
    assert (result["reference_id"] == result["target_id"]).all()
    train = set(toy["manifest"].query("split == 'train' and label == 0")["sample_id"])
    assert set(result["reference_id"]) <= train
    assert result["sample_id"].is_unique
    assert all(s == f"{p}-{d}" for s, p, d in zip(result["sample_id"], result["pair_id"], result["decoder"]))
    for arrays in shard_arrays(out).values():
        assert arrays["image"].dtype == np.uint8 and arrays["image"].shape[1:] == (S, S, 3)
        np.testing.assert_array_equal(arrays["mask"], arrays["region"])
        assert set(np.unique(arrays["region"])) <= {0, 255} and (arrays["region"].reshape(len(arrays["region"]),
                                                                                          -1).max(1) == 255).all()
        assert arrays["attrs"]["generator"] == "baselines" and arrays["attrs"]["resolution"] == S
    # Outside its mask each output is its source, bit for bit; inside, something changed.
    data = ShardDataset(result, ["image", "region"], out, raw=True)
    changed = 0
    for i in range(len(result)):
        item, src = data[i], toy["images"][result.at[i, "reference_id"]]
        outside = item["region"] == 0
        np.testing.assert_array_equal(item["image"][outside], src[outside])
        changed += int((item["image"] != src).any())
    assert changed >= len(result) - 1
    assert sorted(p.name for p in (out / "sheets").glob("*.png")) == ["bottle.png", "nut.png"]


def test_seeded_reproducible_resumable_and_count_defaults_to_generate_local(toy, tmp_path):
    cfg = BaselinesConfig.from_dict({"methods": ["cutpaste", "perlin"], "cutpaste": {"variant": "scar"}},
                                    default_count=3)
    assert cfg.count == 3
    a, b = tmp_path / "a", tmp_path / "b"
    run(toy["index"], toy["manifest"], a, cfg)
    arrays = shard_arrays(a)
    run(toy["index"], toy["manifest"], b, cfg)
    for name, x in arrays.items():
        for k in ("image", "mask", "sample_id"):
            np.testing.assert_array_equal(x[k], shard_arrays(b)[name][k])
    man = pd.read_parquet(a / "manifest.parquet")
    assert man.groupby("category").size().to_dict() == {"bottle": 6, "nut": 6}
    assert set(man["manipulation"]) == {"cutpaste/scar", "perlin/images"}
    # a rerun keeps the finished shards (same fingerprint), a new seed rewrites them
    mtimes = {p.name: p.stat().st_mtime_ns for p in a.glob("shard-*.h5")}
    run(toy["index"], toy["manifest"], a, cfg)
    assert {p.name: p.stat().st_mtime_ns for p in a.glob("shard-*.h5")} == mtimes
    run(toy["index"], toy["manifest"], a, BaselinesConfig.from_dict({"seed": 1, "methods": ["cutpaste", "perlin"],
                                                                     "cutpaste": {"variant": "scar"}}, 3))
    assert not np.array_equal(shard_arrays(a)["shard-00000.h5"]["image"], arrays["shard-00000.h5"]["image"])


def test_one_method_output_does_not_depend_on_the_others_or_the_shard_size(toy, tmp_path):
    both = run(toy["index"], toy["manifest"], tmp_path / "both", BaselinesConfig.from_dict({"count": 4}))
    alone = run(toy["index"], toy["manifest"], tmp_path / "alone",
                BaselinesConfig.from_dict({"count": 4, "methods": ["perlin"], "shard_size": 3}))
    d1 = ShardDataset(both[both["decoder"] == "perlin"], ["image", "mask"], tmp_path / "both", raw=True)
    d2 = ShardDataset(alone, ["image", "mask"], tmp_path / "alone", raw=True)
    assert len(d1) == len(d2) == 8
    for i in range(8):
        np.testing.assert_array_equal(d1[i]["image"], d2[i]["image"])


def test_textures_folder_errors_name_the_config_key(toy, tmp_path):
    empty = tmp_path / "textures"
    with pytest.raises(ValueError, match=r"baselines\.perlin\.textures.*not a folder"):
        run(toy["index"], toy["manifest"], tmp_path / "out", BaselinesConfig.from_dict(
            {"count": 2, "perlin": {"textures": str(empty)}}))
    empty.mkdir()
    cfg = BaselinesConfig.from_dict({"count": 2, "perlin": {"textures": str(empty)}})
    with pytest.raises(ValueError, match=r"baselines\.perlin\.textures.*empty"):
        run(toy["index"], toy["manifest"], tmp_path / "out", cfg)
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"baselines\.perlin\.textures.*notes\.txt"):
        run(toy["index"], toy["manifest"], tmp_path / "out", cfg)
    # a real texture folder: the manipulation says so, and the outputs draw from it
    from PIL import Image

    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(empty / f"t{i}.png")
    result = run(toy["index"], toy["manifest"], tmp_path / "out", cfg)
    assert set(result.loc[result["decoder"] == "perlin", "manipulation"]) == {"perlin/textures"}


def test_bad_settings_name_their_key(toy, tmp_path):
    with pytest.raises(ValueError, match="baselines.methods"):
        BaselinesConfig.from_dict({"methods": ["draem"]})
    with pytest.raises(ValueError, match=r"unknown baselines config key\(s\) \['colour'\]"):
        BaselinesConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="baselines.cutpaste.variant"):
        BaselinesConfig.from_dict({"cutpaste": {"variant": "big"}})
    with pytest.raises(ValueError, match="generate.select"):
        run(toy["index"], toy["manifest"], tmp_path / "x", BaselinesConfig(count=1), select={"split": "val"})


def test_concatenates_with_generated_manifests(toy, tmp_path):
    out = tmp_path / "results" / "baselines"
    run(toy["index"], toy["manifest"], out, BaselinesConfig(count=2))
    other = tmp_path / "results" / "copy"
    other.mkdir()
    for p in out.glob("shard-*.h5"):
        (other / p.name).write_bytes(p.read_bytes())
    man = pd.read_parquet(out / "manifest.parquet")
    write_parquet_atomic(man.assign(sample_id=man["sample_id"] + "-x"), other / "manifest.parquet")
    both = concat_generated(out / "manifest.parquet", other / "manifest.parquet")
    assert len(both) == 2 * len(man)
    data = ShardDataset(both, ["image"], ".", raw=True)
    np.testing.assert_array_equal(data[0]["image"], data[len(man)]["image"])
    with pytest.raises(ValueError, match="share sample ids"):
        concat_generated(out / "manifest.parquet", out / "manifest.parquet")


def test_images_are_made_with_one_opencv_thread_and_the_callers_count_comes_back(toy, tmp_path, monkeypatch,
                                                                                  callers_opencv_threads):
    """OpenCV's thread pool spends more CPU than it saves on one image at a time (Perlin: about 15%
    more CPU, no faster), so the stage makes its images on one thread and gives the caller's count back."""
    import cv2

    import hybrid.stages.baselines as stage

    real, counts = stage.synthesize_one, []

    def synthesize_one(*args, **kwargs):
        counts.append(cv2.getNumThreads())
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "synthesize_one", synthesize_one)
    run(toy["index"], toy["manifest"], tmp_path / "out", BaselinesConfig.from_dict({"count": 2}))
    assert cv2.getNumThreads() == callers_opencv_threads
    assert counts and set(counts) == {1}
