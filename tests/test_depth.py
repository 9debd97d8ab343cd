"""Depth Anything V2 (tiny random model through the real store path), shard encoding, sensor depth."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest
import torch

from hybrid.data.images import ImageError
from hybrid.data.xyz import write_xyz as write_xyz_tiff
from hybrid.models.depth import (
    MEAN,
    STD,
    fill_missing,
    load_depth_anything,
    predict_depth,
    preprocess,
    read_sensor_depth,
    resize_output_size,
    sensor_nearness,
    to_uint16,
)
from tests.tiny_models import save_tiny_depth_anything


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A natural-ish uint8 RGB image: low-frequency waves plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    chans = [128 + 90 * np.sin(yy / 7 + c) * np.cos(xx / 11 - c) for c in range(3)]
    img = np.stack(chans, -1) + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def pil_processor():
    """transformers' DPT processor on its PIL backend (no torchvision), configured as DA-V2's hub file."""
    mod = pytest.importorskip(
        "transformers.models.dpt.image_processing_pil_dpt", reason="needs transformers 5's PIL DPT processor"
    )
    return mod.DPTImageProcessorPil(
        size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
        image_mean=list(MEAN), image_std=list(STD), do_pad=False,
    )


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    ("hw", "expected"),
    [((256, 256), (518, 518)), ((480, 640), (518, 686)), ((70, 90), (406, 518)), ((600, 300), (518, 252)),
     ((20, 30), (350, 518)), ((8, 8), (518, 518)), ((518, 35), (518, 28)), ((518, 21), (518, 28))],
)
def test_resize_output_size_follows_the_dpt_rule(hw, expected):
    # 518x35 and 518x21: 2.5 and 1.5 multiples of 14 both round to 2 (Python's half-to-even round)
    assert resize_output_size(*hw) == expected


def test_resize_output_size_matches_transformers_on_random_shapes():
    mod = pytest.importorskip("transformers.models.dpt.image_processing_pil_dpt")
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 2000, (300, 2)):
        if min(h, w) * 40 < max(h, w):
            continue  # too elongated: a side rounds to 0 (upstream returns 0, we raise)
        ref = mod.get_resize_output_image_size(np.empty((3, h, w)), (518, 518), True, 14)
        assert resize_output_size(int(h), int(w)) == (ref.height, ref.width), (h, w)


def test_resize_output_size_refuses_a_side_of_zero():
    with pytest.raises(ValueError, match="too elongated"):
        resize_output_size(1, 2000)


@pytest.mark.parametrize("hw", [(256, 256), (48, 64), (37, 51), (600, 300), (518, 518)])
@pytest.mark.parametrize("kind", ["smooth", "noise"])
def test_preprocess_matches_transformers_pil_processor(hw, kind):
    proc = pil_processor()
    noise = np.random.default_rng(1).integers(0, 256, (*hw, 3), np.uint8)
    img = smooth_image(*hw) if kind == "smooth" else noise
    ref = proc(images=[img], return_tensors="pt")["pixel_values"]
    ours = preprocess(torch.from_numpy(img)[None])
    assert ours.shape == ref.shape
    std = torch.tensor(STD).view(1, 3, 1, 1)
    levels = ((ours - ref) * std * 255).abs()  # difference in grey levels
    assert levels.max() <= 2.0 + 1e-3
    assert levels.mean() < 0.1


def test_preprocess_accepts_both_layouts_and_refuses_floats():
    img = torch.from_numpy(smooth_image(30, 40))[None]
    assert torch.equal(preprocess(img), preprocess(img.permute(0, 3, 1, 2)))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(img.float())


# ----------------------------------------------------------------------------- the model


@pytest.fixture
def tiny_depth_anything(model_dir):
    """A 137k-parameter random Depth Anything V2 saved where the store looks for the Small model."""
    path = model_dir / "depth_anything" / "Depth-Anything-V2-Small-hf"
    return path, save_tiny_depth_anything(path)


def test_load_by_store_name_gives_the_saved_model_in_eval_mode(tiny_depth_anything):
    path, saved = tiny_depth_anything
    model = load_depth_anything("depth_anything_small")
    assert not model.training
    x = preprocess(torch.from_numpy(smooth_image(20, 400))[None])
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).predicted_depth, saved(pixel_values=x).predicted_depth)
    assert not load_depth_anything(str(path)).training  # a directory works as well


def test_load_missing_model_says_where_to_put_it(model_dir):
    from hybrid.models.store import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="Depth-Anything-V2-Small-hf"):
        load_depth_anything("depth_anything_small")
    with pytest.raises(ValueError, match="neither a directory nor a model-store name"):
        load_depth_anything("depth_anything_tiny")


def test_predict_depth_matches_transformers_pipeline(tiny_depth_anything):
    path, _ = tiny_depth_anything
    model = load_depth_anything(str(path))
    img = smooth_image(30, 400)  # wide images keep the 518-wide model input small (42x518): fast tests
    proc = pil_processor()
    with torch.no_grad():
        out = model(**proc(images=[img], return_tensors="pt"))
    ref = proc.post_process_depth_estimation(out, target_sizes=[(30, 400)])[0]["predicted_depth"]
    ours = predict_depth(model, torch.from_numpy(img)[None])
    assert ours.shape == (1, 30, 400) and ours.dtype == torch.float32
    span = float(ref.max() - ref.min())
    assert float((ours[0] - ref).abs().max()) < 0.02 * span


def test_predict_depth_shapes_layouts_batching_and_precision(tiny_depth_anything):
    path, _ = tiny_depth_anything
    model = load_depth_anything(str(path))
    batch = torch.from_numpy(np.stack([smooth_image(16, 300, seed=s) for s in range(3)]))
    depth = predict_depth(model, batch)
    assert depth.shape == (3, 16, 300) and depth.dtype == torch.float32
    assert predict_depth(model, batch, out_size=(20, 32)).shape == (3, 20, 32)
    torch.testing.assert_close(predict_depth(model, batch.permute(0, 3, 1, 2)), depth)
    torch.testing.assert_close(predict_depth(model, batch[1:2]), depth[1:2], rtol=1e-4, atol=1e-5)
    low = predict_depth(model, batch, precision="bf16")
    assert low.dtype == torch.float32 and low.shape == depth.shape and torch.isfinite(low).all()
    with pytest.raises(ValueError, match="precision"):
        predict_depth(model, batch, precision="int8")


# ----------------------------------------------------------------------------- shard encoding


def test_to_uint16_min_max_per_image_keeps_order():
    d = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    d[1] *= 100
    u = to_uint16(d)
    assert u.dtype == np.uint16 and u.shape == (2, 5, 6)
    for i in range(2):
        assert u[i].min() == 0 and u[i].max() == 65535
        assert u[i].argmax() == int(d[i].argmax()) and u[i].argmin() == int(d[i].argmin())
    np.testing.assert_array_equal(to_uint16(d.numpy()), u)


def test_to_uint16_constant_image_is_zeros_and_nan_is_refused():
    d = np.stack([np.full((4, 4), 3.5), np.arange(16.0).reshape(4, 4)])
    u = to_uint16(d)
    assert (u[0] == 0).all() and u[1].max() == 65535
    np.testing.assert_array_equal(to_uint16(torch.from_numpy(d)), u)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN"):
            to_uint16(np.array([[1.0, bad], [2.0, 3.0]]))
        with pytest.raises(ValueError, match="NaN"):
            to_uint16(torch.tensor([[1.0, bad], [2.0, 3.0]]))


def test_a_tensor_is_encoded_where_it_is_to_the_very_levels_of_the_numpy_path():
    """Depth from a model is encoded on its device (no float maps through the host); the levels
    are those of the float64 numpy formula, half-way cases rounded to even as np.rint does."""
    rng = np.random.default_rng(0)
    scale = 10.0 ** rng.uniform(-4, 4, (24, 1, 1))
    d = (rng.standard_normal((24, 64, 64)) * scale + rng.uniform(-50, 50, (24, 1, 1))).astype(np.float32)
    d[5] = 2.0  # constant: zeros
    d[6] = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) % 3  # levels 0, 0.5 and 1: a tie at 32767.5
    want = to_uint16(d)
    assert (want[6] == 32768).any()  # rint(0.5 * 65535) = 32768 (to even)
    got = to_uint16(torch.from_numpy(d))
    assert got.dtype == np.uint16 and got.shape == d.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(to_uint16(torch.from_numpy(d[0])), want[0])  # one (H, W) map


# ----------------------------------------------------------------------------- sensor depth


def write_raw_xyz_tiff(path, a: np.ndarray, photometric: int) -> None:
    """An uncompressed little-endian float32 TIFF with samples in array order, as tifffile writes
    MVTec 3D-AD's xyz files. photometric 2 = RGB, 1 = min-is-black (+2 extra samples)."""
    a = np.ascontiguousarray(a, dtype="<f4")
    h, w, s = a.shape
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, s, [32] * s), (259, 3, 1, 1), (262, 3, 1, photometric),
            (273, 4, 1, None), (277, 3, 1, s), (278, 4, 1, h), (279, 4, 1, a.nbytes), (339, 3, s, [3] * s)]
    if photometric == 1:
        tags.append((338, 3, s - 1, [0] * (s - 1)))
    tags.sort()
    extra_at = 8 + 2 + 12 * len(tags) + 4
    extra, entries = b"", b""
    data_at = extra_at + sum(2 * t[2] for t in tags if isinstance(t[3], list) and t[2] > 2)
    for tag, typ, count, value in tags:
        if value is None:
            value = data_at
        if isinstance(value, list):
            packed = struct.pack(f"<{count}H", *value)
            if count > 2:
                field, extra = struct.pack("<I", extra_at + len(extra)), extra + packed
            else:
                field = packed.ljust(4, b"\0")
        else:
            field = struct.pack("<I" if typ == 4 else "<H", value).ljust(4, b"\0")
        entries += struct.pack("<HHI", tag, typ, count) + field
    blob = b"II*\0" + struct.pack("<IH", 8, len(tags)) + entries + struct.pack("<I", 0) + extra
    assert len(blob) == data_at
    path.write_bytes(blob + a.tobytes())


def known_xyz(h: int = 6, w: int = 7) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([xx * 0.1 - 5, yy * 0.1 + 7, 100 + xx + 10 * yy], -1)  # x, y, z all distinct


@pytest.mark.parametrize("photometric", [2, 1])
def test_read_sensor_depth_takes_z_from_a_tifffile_style_tiff(tmp_path, photometric):
    xyz = known_xyz()
    write_raw_xyz_tiff(tmp_path / "raw.tiff", xyz, photometric)
    np.testing.assert_array_equal(read_sensor_depth(tmp_path / "raw.tiff"), xyz[..., 2])


def test_write_xyz_tiff_stores_the_tifffile_layout(tmp_path):
    xyz = known_xyz()
    write_xyz_tiff(tmp_path / "cv.tiff", xyz)
    write_raw_xyz_tiff(tmp_path / "raw.tiff", xyz, 2)
    np.testing.assert_array_equal(read_sensor_depth(tmp_path / "cv.tiff"), xyz[..., 2])
    # same pixel samples on disk: cv2 decodes both files to the same array
    np.testing.assert_array_equal(
        cv2.imread(str(tmp_path / "cv.tiff"), cv2.IMREAD_UNCHANGED),
        cv2.imread(str(tmp_path / "raw.tiff"), cv2.IMREAD_UNCHANGED),
    )


def test_read_sensor_depth_reads_the_demo_height_maps(tmp_path):
    demo = pytest.importorskip("hybrid.data.demo")
    if not hasattr(demo, "write_xyz"):
        pytest.skip("hybrid.data.demo has no write_xyz")
    xyz = known_xyz()
    demo.write_xyz(tmp_path / "demo.tiff", xyz)  # deflate-compressed, floating-point predictor
    np.testing.assert_array_equal(read_sensor_depth(tmp_path / "demo.tiff"), xyz[..., 2])


def test_read_sensor_depth_single_channel_and_missing_values(tmp_path):
    z = np.full((4, 5), 2.0, np.float32)
    z[0, 0], z[1, 1], z[2, 2], z[3, 3] = 0.0, -1.0, np.nan, np.inf
    assert cv2.imwrite(str(tmp_path / "z.tiff"), z)
    got = read_sensor_depth(tmp_path / "z.tiff")
    assert got.dtype == np.float32 and got.shape == (4, 5)
    missing = np.isnan(got)
    assert missing.sum() == 4 and missing[0, 0] and missing[1, 1] and missing[2, 2] and missing[3, 3]
    assert (got[~missing] == 2.0).all()


def test_read_sensor_depth_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.tiff"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(ImageError, match="broken.tiff"):
        read_sensor_depth(bad)
    empty = tmp_path / "empty.tiff"
    xyz = known_xyz()
    xyz[..., 2] = 0.0
    write_xyz_tiff(empty, xyz)
    with pytest.raises(ImageError, match="empty.tiff.*missing"):
        read_sensor_depth(empty)
    rgb = tmp_path / "rgb.png"
    cv2.imwrite(str(rgb), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="rgb.png"):
        read_sensor_depth(rgb)


def test_fill_missing_takes_the_nearest_valid_pixel():
    n = np.nan
    z = np.array([[1, n, n, n, n, 5],
                  [1, 1, n, n, 5, 5],
                  [n, 1, n, n, 5, n]], np.float32)
    filled = fill_missing(z)
    np.testing.assert_array_equal(filled, [[1, 1, 1, 5, 5, 5], [1, 1, 1, 5, 5, 5], [1, 1, 1, 5, 5, 5]])
    assert np.isnan(z).sum() == 10  # the input is left as it was
    with pytest.raises(ValueError, match="every pixel"):
        fill_missing(np.full((2, 2), np.nan, np.float32))


def test_sensor_nearness_is_larger_for_nearer_points(tmp_path):
    xyz = known_xyz(8, 12)
    xyz[..., 2] = 100 + np.arange(12, dtype=np.float32)[None, :]  # farther to the right
    xyz[3, 4, 2] = 0.0  # a hole, filled from its neighbours
    write_xyz_tiff(tmp_path / "h.tiff", xyz)
    near = sensor_nearness(tmp_path / "h.tiff", (4, 6))
    assert near.shape == (4, 6) and near.dtype == np.float32 and np.isfinite(near).all()
    assert (np.diff(near, axis=1) < 0).all()
    u = to_uint16(near)
    assert (u[:, 0] == 65535).all() and (u[:, -1] == 0).all()
