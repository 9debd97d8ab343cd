"""Preprocess maps: at the original size (maps_at) and sensor depth beside pseudo depth (sensor_depth)."""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

import hybrid.stages.preprocess as pp
from hybrid.data.images import fit, read_capped
from hybrid.data.manifest import make_manifest
from hybrid.data.readers import read_dataset
from hybrid.data.shards import ShardDataset, to_unit
from hybrid.data.xyz import write_xyz
from hybrid.models.depth import sensor_nearness, to_uint16
from hybrid.stages.preprocess import PreprocessConfig, fingerprint
from hybrid.stages.preprocess import run as preprocess
from tests.compile_doubles import Broken, Recorder
from tests.tiny_models import save_random_pidinet, save_tiny_depth_anything


def _cfg(**kw) -> PreprocessConfig:
    return PreprocessConfig(**{"resolution": 32, "edge_model": "canny", "depth_source": "none", "workers": 0,
                               "batch_size": 4, "shard_size": 3, "device": "cpu", **kw})


def _folder_manifest(paths: list[Path]) -> pd.DataFrame:
    return make_manifest([{"sample_id": f"s{i}", "dataset": "folder", "split": "train", "label": 0,
                           "image_path": str(p)} for i, p in enumerate(paths)], "test")


def _shards(out: Path) -> dict[str, np.ndarray]:
    """Every array of every shard, concatenated in index order."""
    arrays: dict[str, list] = {}
    for p in sorted(out.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            for k in ("image", "edge", "depth", "depth_sensor", "mask"):
                if k in f:
                    arrays.setdefault(k, []).append(f[k][:])
    return {k: np.concatenate(v) for k, v in arrays.items()}


def _attrs(out: Path) -> dict:
    with h5py.File(out / "shard-00000.h5", "r") as f:
        return dict(f.attrs)


# ------------------------------------------------------------------ maps at the original size


def _striped(path: Path, h: int = 512, w: int = 512, dx: int = 0) -> Path:
    """Black, with a band of 1 px white lines every 4 px (finer than the working
    grid: a 4x area downscale averages them to flat grey) and a large white rectangle."""
    a = np.zeros((h, w, 3), np.uint8)
    a[32:224, 32 + dx:480 + dx][:, np.arange(448) % 4 == 0] = 255
    a[300:460, 100 + dx:400 + dx] = 255
    cv2.imwrite(str(path), a)
    return path


def _centroid(profile: np.ndarray, around: int, half: int = 5) -> float:
    lo = max(0, around - half)
    win = profile[lo:around + half + 1].astype(np.float64)
    return float((win * np.arange(lo, lo + len(win))).sum() / win.sum())


def test_fine_stripes_give_edges_at_original_size_and_vanish_at_working_size(tmp_path):
    m = _folder_manifest([_striped(tmp_path / "s.png")])
    cfg = dict(resolution=128, shard_size=8)
    preprocess(m, tmp_path / "w", _cfg(**cfg))
    preprocess(m, tmp_path / "o", _cfg(maps_at="original", **cfg))
    work, orig = _shards(tmp_path / "w"), _shards(tmp_path / "o")

    np.testing.assert_array_equal(orig["image"], work["image"])  # same pixels, only the maps differ
    inside = (slice(12, 52), slice(12, 116))  # the striped band (8..56 x 8..120 at 128 px), 4 px in
    e_work, e_orig = work["edge"][0][inside].astype(float), orig["edge"][0][inside].astype(float)
    # At 128 px the lines average to flat grey: no edges. At 512 px Canny marks both sides of
    # every line (two pixels in four), and the area resize keeps that density: half strength.
    assert e_work.mean() < 2
    assert abs(e_orig.mean() - 128) < 8 and (e_orig > 0).mean() > 0.9
    # Canny at the working size is 0/255; area-resized original edges are graded.
    assert set(np.unique(work["edge"])) <= {0, 255} and len(np.unique(orig["edge"])) > 2


@pytest.mark.parametrize("how", ["stretch", "crop", "pad"])
def test_image_and_maps_stay_aligned_for_every_fit(tmp_path, how):
    # 512 x 640: crop and pad differ from stretch, so the maps must be fitted like the image.
    m = _folder_manifest([_striped(tmp_path / "s.png", 512, 640, dx=64)])
    cfg = dict(resolution=128, shard_size=8, fit=how)
    preprocess(m, tmp_path / "w", _cfg(**cfg))
    preprocess(m, tmp_path / "o", _cfg(maps_at="original", **cfg))
    work, orig = _shards(tmp_path / "w"), _shards(tmp_path / "o")
    np.testing.assert_array_equal(orig["image"], work["image"])
    img = work["image"][0].mean(-1)
    # The rectangle's left edge (a row band through it) and top edge (a column band through it),
    # located in the working image, then in both edge maps.
    ys, xs = np.nonzero(img > 200)
    rect = ys > img.shape[0] * 0.55  # the rectangle lies below the stripes
    top, bottom, left, right = ys[rect].min(), ys[rect].max(), xs[rect].min(), xs[rect].max()
    rows = slice(top + (bottom - top) // 4, bottom - (bottom - top) // 4)
    cols = slice(left + (right - left) // 4, right - (right - left) // 4)
    for edge_axis, band, at in ((0, rows, left), (1, cols, top)):
        profiles = [(e[0][band, :].mean(0) if edge_axis == 0 else e[0][:, band].mean(1)) for e in
                    (work["edge"], orig["edge"])]
        c_work, c_orig = (_centroid(p, int(at)) for p in profiles)
        assert abs(c_work - c_orig) <= 1.0, (how, edge_axis, c_work, c_orig)
        assert abs(c_work - at) <= 1.5


def _mixed_sizes(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    sizes = [(48, 64), (48, 64), (40, 40), (48, 64), (56, 36), (48, 64), (48, 64)]
    paths = []
    for i, (h, w) in enumerate(sizes):
        a = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
        cv2.circle(a, (w // 2, h // 2), min(h, w) // 4, (255, 255, 255), -1)
        paths.append(tmp_path / "img" / f"{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(paths[-1]), a)
    return paths


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    save_random_pidinet(d / "pidinet_tiny.pth", "pidinet_tiny")
    save_tiny_depth_anything(d / "da")
    return {"pidinet_tiny": str(d / "pidinet_tiny.pth"), "depth_anything_small": str(d / "da")}


def test_size_buckets_give_the_maps_of_one_by_one(tmp_path, tiny_weights, monkeypatch):
    m = _folder_manifest(_mixed_sizes(tmp_path))
    batches = []
    real = pp.MapComputer.at_original

    def spy(self, images, *args):
        batches.append(images.shape[:3])
        return real(self, images, *args)

    monkeypatch.setattr(pp.MapComputer, "at_original", spy)
    cfg = dict(maps_at="original", edge_model="pidinet_tiny", depth_source="depth_anything_small",
               paths=tiny_weights)
    cfg["shard_size"] = 6  # a shard's end runs what waits; 6 lets four 48x64 images meet
    preprocess(m, tmp_path / "one", _cfg(batch_size=1, **cfg))
    assert len(batches) == len(m) and all(b[0] == 1 for b in batches)
    batches.clear()
    preprocess(m, tmp_path / "batched", _cfg(batch_size=4, **cfg))
    assert sum(b[0] for b in batches) == len(m)
    assert (4, 48, 64) in batches  # the common size runs at full batch, across loader batches
    assert (1, 56, 36) in batches  # the size seen once runs alone

    one, batched = _shards(tmp_path / "one"), _shards(tmp_path / "batched")
    assert set(one) == set(batched) == {"image", "edge", "depth"}
    np.testing.assert_array_equal(one["image"], batched["image"])
    for k in ("edge", "depth"):  # float sums may differ in the last bit between batch sizes
        diff = np.abs(one[k].astype(np.int64) - batched[k].astype(np.int64))
        assert diff.max() <= 1, k  # one level of 255 / 65535 at most
    assert pd.read_parquet(tmp_path / "batched" / "index.parquet")["sample_id"].tolist() == list(m["sample_id"])


def test_original_equals_working_when_the_images_are_already_working_size(tmp_path, tiny_weights):
    paths = []
    rng = np.random.default_rng(1)
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    m = _folder_manifest(paths)
    cfg = dict(edge_model="pidinet_tiny", depth_source="depth_anything_small", paths=tiny_weights)
    preprocess(m, tmp_path / "w", _cfg(**cfg))
    preprocess(m, tmp_path / "o", _cfg(maps_at="original", **cfg))
    work, orig = _shards(tmp_path / "w"), _shards(tmp_path / "o")
    for k in ("image", "edge", "depth"):
        np.testing.assert_array_equal(orig[k], work[k], err_msg=k)


def test_working_size_maps_are_the_networks_outputs_encoded_as_the_shards_store_them(tmp_path, tiny_weights):
    """Both networks run on the device before either result comes back, and depth is encoded
    there: the shards hold the very levels of each network's output encoded on the host."""
    import torch

    from hybrid.models.depth import load_depth_anything, predict_depth
    from hybrid.models.edges import make_edge_detector

    rng = np.random.default_rng(2)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    m = _folder_manifest(paths)
    preprocess(m, tmp_path / "out", _cfg(edge_model="pidinet_tiny", depth_source="depth_anything_small",
                                         paths=tiny_weights, batch_size=8, shard_size=8))  # one batch
    got = _shards(tmp_path / "out")
    batch = torch.from_numpy(got["image"])
    edge = make_edge_detector("pidinet_tiny", torch.device("cpu"), tiny_weights["pidinet_tiny"], precision="fp32")
    e = edge(batch).float().clamp(0, 1).numpy()
    np.testing.assert_array_equal(got["edge"], np.round(e * np.float32(255)).astype(np.uint8))
    depth = predict_depth(load_depth_anything(tiny_weights["depth_anything_small"]), batch)
    np.testing.assert_array_equal(got["depth"], to_uint16(depth.numpy()))


def _random_pngs(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return paths


def test_compiled_networks_give_the_eager_maps_up_to_float_rounding(tmp_path, tiny_weights, caplog):
    """preprocess.compile runs PiDiNet and Depth Anything through torch.compile (inductor's CPU
    kernels here): the same images, edges and depth up to a level of rounding, and the same
    fingerprints (a speed switch: shards written eagerly stay current)."""
    m = _folder_manifest(_random_pngs(tmp_path, 5, 3))
    cfg = dict(edge_model="pidinet_tiny", depth_source="depth_anything_small", paths=tiny_weights, batch_size=8)
    preprocess(m, tmp_path / "eager", _cfg(**cfg))
    with caplog.at_level("INFO"):
        preprocess(m, tmp_path / "compiled", _cfg(compile=True, **cfg))
    assert "run through torch.compile" in caplog.text and "torch.compile failed" not in caplog.text
    eager, compiled = _shards(tmp_path / "eager"), _shards(tmp_path / "compiled")
    np.testing.assert_array_equal(compiled["image"], eager["image"])
    for k in ("edge", "depth"):
        diff = np.abs(compiled[k].astype(np.int64) - eager[k].astype(np.int64))
        assert diff.max() <= 1, k
    assert _attrs(tmp_path / "compiled")["fingerprint"] == _attrs(tmp_path / "eager")["fingerprint"]


def test_a_compile_failure_falls_back_to_eager_maps_with_a_warning(tmp_path, tiny_weights, monkeypatch, caplog):
    import torch

    m = _folder_manifest(_random_pngs(tmp_path, 5, 4))
    cfg = dict(edge_model="pidinet_tiny", depth_source="depth_anything_small", paths=tiny_weights)
    preprocess(m, tmp_path / "eager", _cfg(**cfg))
    monkeypatch.setattr(torch, "compile", Broken)
    with caplog.at_level("WARNING"):
        preprocess(m, tmp_path / "fallback", _cfg(compile=True, **cfg))
    assert "torch.compile failed (RuntimeError: no C++ compiler here); computing the maps eagerly" in caplog.text
    eager, fallback = _shards(tmp_path / "eager"), _shards(tmp_path / "fallback")
    assert eager.keys() == fallback.keys() == {"image", "edge", "depth"}
    for k in eager:
        np.testing.assert_array_equal(fallback[k], eager[k], err_msg=k)


def test_compiled_networks_get_the_last_batch_padded_to_the_compiled_size(tmp_path, tiny_weights, monkeypatch):
    import torch

    m = _folder_manifest(_random_pngs(tmp_path, 7, 5))  # batches of 4 and 3
    cfg = dict(edge_model="pidinet_tiny", depth_source="depth_anything_small", paths=tiny_weights, batch_size=4,
               shard_size=8)
    preprocess(m, tmp_path / "eager", _cfg(**cfg))
    recorder = Recorder()
    monkeypatch.setattr(torch, "compile", recorder)
    preprocess(m, tmp_path / "padded", _cfg(compile=True, **cfg))
    assert sorted(recorder.calls) == [("DepthAnythingForDepthEstimation", 4)] * 2 + [("PiDiNet", 4)] * 2
    eager, padded = _shards(tmp_path / "eager"), _shards(tmp_path / "padded")
    for k in ("image", "edge", "depth"):
        assert padded[k].shape == eager[k].shape == (7, *eager[k].shape[1:]), k
        assert np.abs(padded[k].astype(np.int64) - eager[k].astype(np.int64)).max() <= 1, k


def test_maps_at_is_recorded_and_changing_it_rewrites_the_shards(tmp_path):
    m = _folder_manifest(_mixed_sizes(tmp_path)[:4])
    out = tmp_path / "out"
    preprocess(m, out, _cfg())
    a = _attrs(out)
    assert a["maps_at"] == "working" and "maps_max_pixels" not in a and a["arrays"] == "image,edge"
    assert fingerprint(m, _cfg()) != fingerprint(m, _cfg(maps_at="original"))
    assert fingerprint(m, _cfg(maps_at="original")) != fingerprint(m, _cfg(maps_at="original", maps_max_pixels=5000))
    assert fingerprint(m, _cfg()) == fingerprint(m, _cfg(maps_batch_pixels=5, maps_max_pixels=5000))
    preprocess(m, out, _cfg(maps_at="original"))
    a = _attrs(out)
    assert a["maps_at"] == "original" and a["maps_max_pixels"] == 4_194_304


def test_originals_above_maps_max_pixels_are_reduced(tmp_path):
    a = cv2.resize(np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8), (400, 300))
    for name in ("big.jpg", "big.png"):
        cv2.imwrite(str(tmp_path / name), a)
        assert read_capped(tmp_path / name, 10**6).shape == (300, 400, 3)  # under the cap: whole
        small = read_capped(tmp_path / name, 12_000)
        h, w = small.shape[:2]
        assert h * w <= 12_000 and h * w > 10_000 and abs(w / h - 4 / 3) < 0.05
    jpeg_quarter = read_capped(tmp_path / "big.jpg", 100 * 75)  # exactly the 1/4 DCT scale
    assert jpeg_quarter.shape == (75, 100, 3)
    with pytest.raises(ValueError, match="maps_max_pixels"):
        PreprocessConfig.from_dict({"resolution": 256, "maps_max_pixels": 1000})
    with pytest.raises(ValueError, match="maps_at"):
        PreprocessConfig.from_dict({"maps_at": "native"})


# ------------------------------------------------------------------ sensor depth beside pseudo depth


def _mvtec_3d(root: Path, n: int = 4, h: int = 40, w: int = 40) -> pd.DataFrame:
    """A tiny MVTec 3D-AD tree (rgb png, xyz tiff with a tilted plane, a bump and missing pixels)."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        d = root / "bagel" / "train" / "good"
        (d / "rgb").mkdir(parents=True, exist_ok=True)
        (d / "xyz").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / "rgb" / f"{i:03d}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        z = 1.0 + 0.01 * xx + 0.02 * i * yy - 0.3 * np.exp(-((xx - w / 2) ** 2 + (yy - h / 3) ** 2) / 30)
        z[rng.random((h, w)) < 0.05] = 0  # missing
        write_xyz(d / "xyz" / f"{i:03d}.tiff", np.dstack([xx / w, yy / h, z]))
    return read_dataset("mvtec_3d", {"root": str(root)})


@pytest.mark.parametrize("how", ["stretch", "crop"])
def test_sensor_depth_is_stored_beside_the_depth_source(tmp_path, how):
    m = _mvtec_3d(tmp_path / "m3d", w=56)
    out = tmp_path / "out"
    preprocess(m, out, _cfg(fit=how))  # sensor_depth: auto, depth_source: none
    arrays = _shards(out)
    assert set(arrays) == {"image", "edge", "depth_sensor"}
    want = []
    for p in m["depth_path"]:
        near = sensor_nearness(p, (32, 32)) if how == "stretch" else fit(sensor_nearness(p, None), 32, how)
        want.append(to_uint16(near))
    np.testing.assert_array_equal(arrays["depth_sensor"], np.stack(want))
    a = _attrs(out)
    assert a["depth_source"] == "none" and a["depth_sensor_source"] == "sensor"
    assert a["arrays"] == "image,edge,depth_sensor"
    item = ShardDataset(out / "index.parquet", fields=("depth_sensor",))[1]  # scaled like depth
    assert item["depth_sensor"].shape == (1, 32, 32)
    np.testing.assert_allclose(item["depth_sensor"].numpy(), to_unit(want[1], "depth").numpy())


def test_pseudo_and_sensor_depth_together(tmp_path, tiny_weights):
    m = _mvtec_3d(tmp_path / "m3d")
    out = tmp_path / "out"
    preprocess(m, out, _cfg(depth_source="depth_anything_small", paths=tiny_weights, maps_at="original"))
    arrays = _shards(out)
    assert set(arrays) == {"image", "edge", "depth", "depth_sensor"}
    np.testing.assert_array_equal(arrays["depth_sensor"],
                                  np.stack([to_uint16(sensor_nearness(p, (32, 32))) for p in m["depth_path"]]))
    assert not np.array_equal(arrays["depth"], arrays["depth_sensor"])
    a = _attrs(out)
    assert (a["depth_source"], a["depth_sensor_source"]) == ("depth_anything_small", "sensor")


def test_sensor_depth_settings(tmp_path):
    m = _mvtec_3d(tmp_path / "m3d", n=3)
    # depth already is the sensor depth: auto adds no copy; true asks for one.
    preprocess(m, tmp_path / "a", _cfg(depth_source="dataset"))
    assert set(_shards(tmp_path / "a")) == {"image", "edge", "depth"}
    assert _attrs(tmp_path / "a")["depth_sensor_source"] == ""
    preprocess(m, tmp_path / "b", _cfg(depth_source="dataset", sensor_depth=True))
    b = _shards(tmp_path / "b")
    np.testing.assert_array_equal(b["depth"], b["depth_sensor"])
    preprocess(m, tmp_path / "c", _cfg(sensor_depth=False))
    assert set(_shards(tmp_path / "c")) == {"image", "edge"}

    # a row without depth: auto quietly leaves depth_sensor out; true names the row.
    m.loc[1, "depth_path"] = None
    preprocess(m, tmp_path / "d", _cfg())
    assert set(_shards(tmp_path / "d")) == {"image", "edge"}
    with pytest.raises(ValueError, match=r"sensor_depth: true.*1 of 3 .*mvtec_3d/bagel/train/good/001"):
        preprocess(m, tmp_path / "e", _cfg(sensor_depth=True))

    assert PreprocessConfig.from_dict({"sensor_depth": "true"}).sensor_depth is True
    with pytest.raises(ValueError, match="sensor_depth"):
        PreprocessConfig.from_dict({"sensor_depth": "yes"})


def test_storing_sensor_depth_changes_the_fingerprint(tmp_path):
    m = _mvtec_3d(tmp_path / "m3d", n=2)
    assert fingerprint(m, _cfg(), True) != fingerprint(m, _cfg(), False)
    out = tmp_path / "out"
    preprocess(m, out, _cfg(sensor_depth=False))
    preprocess(m, out, _cfg())  # auto: now stores depth_sensor, so the shard is rewritten
    assert "depth_sensor" in _shards(out)
