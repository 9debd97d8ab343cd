"""DINOv2 features (tiny random model through the real store path), preprocessing, cache, heads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hybrid.classify import (
    MEAN,
    STD,
    HeadConfig,
    extract_features,
    load_dinov2,
    preprocess,
    run_classification,
    training_sets,
)
from hybrid.metrics.challenge import read_predictions

HIDDEN = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny_dinov2(path, seed: int = 0) -> None:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(image_size=56, patch_size=14, hidden_size=HIDDEN, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64)
    Dinov2Model(cfg).save_pretrained(path)


@pytest.fixture
def tiny(model_dir):
    """A tiny random DINOv2 where the store looks for dinov2_base, loaded through the store."""
    save_tiny_dinov2(model_dir / "dinov2" / "dinov2-base")
    return load_dinov2("dinov2_base")


def images(seed: int, shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]


def test_store_loading_and_feature_definition(tiny, model_dir):
    assert str(tiny.config.name_or_path).endswith("dinov2/dinov2-base")
    imgs = images(0, [(40, 60, 3), (300, 200, 3), (224, 224, 3)])
    feats = extract_features(tiny, imgs, batch_size=2, progress=False)
    assert feats.shape == (3, 2 * HIDDEN) and feats.dtype == np.float32
    with torch.no_grad():
        for img, f in zip(imgs, feats):
            h = tiny(pixel_values=preprocess(img)[None]).last_hidden_state[0]
            assert h.shape == (1 + (224 // 14) ** 2, HIDDEN)  # CLS + 16 x 16 patches at 224
            expected = torch.cat([h[0], h[1:].mean(dim=0)]).numpy()  # CLS then mean of patch tokens
            np.testing.assert_allclose(f, expected, atol=1e-5)
            np.testing.assert_allclose(f[:HIDDEN], h[0].numpy(), atol=1e-5)
    # A save_pretrained directory loads directly; a missing store weight names where to put it.
    assert load_dinov2(str(model_dir / "dinov2" / "dinov2-base")).config.hidden_size == HIDDEN
    from hybrid.models.store import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="dinov2-small"):
        load_dinov2("dinov2_small")
    with pytest.raises(ValueError, match="neither a directory nor a model-store name"):
        load_dinov2("resnet50")


def test_preprocess_matches_pil_bilinear_and_imagenet_normalisation():
    mean, std = np.array(MEAN), np.array(STD)

    def reference(img: np.ndarray) -> np.ndarray:  # what torchvision Resize((224,224)) does on PIL
        r = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR), dtype=np.float64)
        return ((r / 255 - mean) / std).transpose(2, 0, 1)

    one_level = 1 / 255 / std.min()
    # Enlarge and shrink. Pillow always resampled the width first until python-pillow/Pillow#9549
    # (2026), which goes height first when the height shrinks much more; the shapes here are ones
    # where both orders agree (the 2024 baseline's Pillow is width first).
    for img in images(1, [(37, 53, 3), (300, 420, 3), (230, 500, 3)]):
        x = preprocess(img)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        d = np.abs(x.numpy() - reference(img))
        assert d.max() <= one_level + 1e-5  # at most one grey level off PIL
        assert (d > 1e-4).mean() < 0.03  # and on few pixels
    # No resize at 224 x 224: exactly /255 then ImageNet mean/std, channel by channel.
    img = images(2, [(224, 224, 3)])[0]
    np.testing.assert_allclose(preprocess(img).numpy(), ((img / 255 - mean) / std).transpose(2, 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((10, 10), np.uint8))


def test_feature_cache_computes_only_new_ids(tiny, tmp_path):
    calls = []
    tiny.register_forward_hook(lambda m, args, kwargs_or_out: calls.append(1))
    imgs = images(3, [(50, 50, 3)] * 4)
    cache = tmp_path / "features"

    first = extract_features(tiny, imgs[:3], batch_size=2, ids=["a", "b", "c"], cache_dir=cache, progress=False)
    assert len(calls) == 2 and (cache / "dinov2-base.npz").is_file()  # batches of 2 + 1

    calls.clear()
    again = extract_features(tiny, imgs[:3], batch_size=2, ids=["a", "b", "c"], cache_dir=cache, progress=False)
    assert calls == [] and np.array_equal(again, first)

    mixed = extract_features(tiny, [imgs[2], imgs[3]], ids=["c", "d"], cache_dir=cache, progress=False)
    assert len(calls) == 1  # only "d" is new
    np.testing.assert_array_equal(mixed[0], first[2])
    np.testing.assert_allclose(mixed[1], extract_features(tiny, [imgs[3]], progress=False)[0], atol=1e-5)

    # Other weights under the same name do not reuse the file.
    save_tiny_dinov2(tmp_path / "other" / "dinov2-base", seed=1)
    other = load_dinov2(str(tmp_path / "other" / "dinov2-base"))
    assert not np.allclose(extract_features(other, imgs[:1], ids=["a"], cache_dir=cache, progress=False)[0], first[0])

    # A damaged cache file is recomputed and replaced, not fatal.
    (cache / "dinov2-base.npz").write_bytes(b"not an npz")
    calls.clear()
    np.testing.assert_array_equal(
        extract_features(tiny, imgs[:1], ids=["a"], cache_dir=cache, progress=False)[0], first[0])
    assert len(calls) == 1

    # Paths are read from disk and are their own ids; arrays need ids to be cached.
    paths = []
    for i, img in enumerate(imgs[:2]):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    from_paths = extract_features(tiny, paths, cache_dir=tmp_path / "c2", progress=False)
    np.testing.assert_allclose(from_paths, first[:2], atol=1e-5)
    with pytest.raises(ValueError, match="pass ids="):
        extract_features(tiny, imgs[:1], cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="repeated sample ids"):
        extract_features(tiny, imgs[:2], ids=["a", "a"], progress=False)


def toy_problem(seed: int = 0):
    """Non-hybrids are noise; signal and mimic hybrids shift feature 0, non-signal (minor) hybrids
    shift feature 1. The training set has only signal hybrids; generated "AHE" hybrids shift
    feature 1 (the missing kind), "AHD" ones feature 0."""
    rng = np.random.default_rng(seed)
    d = 16

    def rows(n, dim=None):
        x = rng.normal(0, 0.5, (n, d)).astype(np.float32)
        if dim is not None:
            x[:, dim] += 3
        return x

    x_train = np.concatenate([rows(150), rows(30, 0)])
    y_train = np.r_[np.zeros(150), np.ones(30)].astype(int)
    parts = [("major", 0, rows(40)), ("major", 1, rows(20, 0)), ("minor", 0, rows(40)),
             ("minor", 1, rows(10, 1)), ("mimic", 0, rows(40)), ("mimic", 1, rows(20, 0))]
    ref = pd.DataFrame([{"filename": f"{s}_{y}_{i}.JPG", "hybrid_stat": y, "ssp_indicator": s}
                        for s, y, x in parts for i in range(len(x))])
    x_test = np.concatenate([x for _, _, x in parts])
    generated = {"AHD": rows(25, 0), "AHE": rows(35, 1)}
    return x_train, y_train, generated, x_test, ref


def test_run_classification_table_and_generated_hybrids_help(tmp_path):
    x_train, y_train, generated, x_test, ref = toy_problem()
    table = run_classification(x_train, y_train, generated, x_test, ref.filename.tolist(), ref, seed=0,
                               config=HeadConfig(linear_epochs=20), out_dir=tmp_path / "pred")
    assert len(table) == 8
    assert set(zip(table["head"], table["train_set"])) == {
        (h, s) for h in ("linear", "sgd") for s in ("train", "train+AHD", "train+AHE", "train+both")}
    t = table.set_index(["head", "train_set"])
    for head in ("linear", "sgd"):
        # Generated hybrids are added to the 180 training rows.
        assert t.loc[(head, "train"), ["n_train", "n_generated"]].tolist() == [180, 0]
        assert t.loc[(head, "train+AHD"), ["n_train", "n_generated"]].tolist() == [205, 25]
        assert t.loc[(head, "train+AHE"), ["n_train", "n_generated"]].tolist() == [215, 35]
        assert t.loc[(head, "train+both"), ["n_train", "n_generated"]].tolist() == [240, 60]
        # Separable along feature 0: signal and mimic hybrids are found from the training set alone.
        assert t.loc[(head, "train"), "major_recall"] >= 0.9 and t.loc[(head, "train"), "mimic_recall"] >= 0.9
        # Non-signal hybrids (feature 1) are missed until AHE-like generated hybrids teach it.
        assert t.loc[(head, "train"), "minor_recall"] <= 0.3
        assert t.loc[(head, "train+AHD"), "minor_recall"] <= 0.3
        for s in ("train+AHE", "train+both"):
            assert t.loc[(head, s), "minor_recall"] >= 0.9 and t.loc[(head, s), "challenge_score"] >= 0.9
    files = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert len(files) == 8 and "sgd_train+AHE.txt" in files
    pred = read_predictions(tmp_path / "pred" / "linear_train+both.txt")
    assert pred.filename.tolist() == ref.filename.tolist() and pred.score.between(0, 1).all()


def test_same_seed_same_scores_and_input_errors():
    x_train, y_train, generated, x_test, ref = toy_problem()
    cfg = HeadConfig(linear_epochs=3)
    a = run_classification(x_train, y_train, {}, x_test, ref.filename, ref, seed=3, config=cfg)
    b = run_classification(x_train, y_train, {}, x_test, ref.filename, ref, seed=3, config=cfg)
    pd.testing.assert_frame_equal(a, b)
    assert a["train_set"].tolist() == ["train", "train"]

    with pytest.raises(ValueError, match=r"generated set 'AHD' has shape \(5, 3\)"):
        training_sets(x_train, y_train, {"AHD": np.zeros((5, 3))})
    with pytest.raises(ValueError, match="both 0 .* and 1"):
        run_classification(x_train, np.zeros(len(x_train)), {}, x_test, ref.filename, ref)
    with pytest.raises(ValueError, match="one row per test filename"):
        run_classification(x_train, y_train, {}, x_test[:-1], ref.filename, ref)
    with pytest.raises(ValueError, match="unknown classify config key"):
        HeadConfig.from_dict({"linear_epoch": 3})
    assert HeadConfig.from_dict({"linear_hidden": [64, 32]}).linear_hidden == (64, 32)
