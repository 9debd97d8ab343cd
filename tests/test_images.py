"""Image decoding: every format a dataset may hold, and every way a file can be broken."""

import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from hybrid.data.images import ImageError, decode, fit, read_image, read_mask


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    a = np.zeros((48, 64, 3), np.uint8)
    a[:, :32] = (200, 30, 30)  # left half red, right half blue: orientation and channel order visible
    a[:, 32:] = (30, 30, 200)
    return np.clip(a.astype(int) + rng.integers(-5, 6, a.shape), 0, 255).astype(np.uint8)


def test_png_keeps_rgb_order(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(decode(tmp_path / "a.png"), rgb)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "RGBA", "LA"])
def test_modes_decode_to_rgb(tmp_path, rgb, mode):
    im = Image.fromarray(rgb)
    if mode == "I;16":
        path = tmp_path / "a.png"
        cv2.imwrite(str(path), (rgb[..., ::-1].astype(np.uint16) * 257))  # 16-bit colour PNG
    elif mode in ("RGBA", "LA"):
        path = tmp_path / "a.png"
        im.convert(mode).save(path)
    else:
        path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
        im.convert(mode).save(path, quality=95) if mode == "CMYK" else im.convert(mode).save(path)
    out = decode(path)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    if mode in ("L", "LA"):
        ref = np.asarray(im.convert("L"))[..., None].repeat(3, 2)
    elif mode == "P":  # the palette quantises: compare with the palette's own colours
        ref = np.asarray(im.convert("P").convert("RGB"))
    else:
        ref = rgb
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 12


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255  # red, fully transparent: shows white
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    assert (decode(tmp_path / "t.png") == 255).all()


def test_exif_orientation_honoured(tmp_path, rgb):
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = decode(tmp_path / "r.jpg")
    assert out.shape == (64, 48, 3)
    assert out[:16, :, 0].mean() > out[:16, :, 2].mean()  # red (left half) is now on top


def test_reduced_decode_of_large_jpeg_matches_full(tmp_path):
    yy, xx = np.mgrid[0:1536, 0:2048]
    a = np.stack([xx % 256, yy % 256, (xx + yy) // 16 % 256], -1).astype(np.uint8)
    a = cv2.GaussianBlur(a, (0, 0), 8)
    cv2.imwrite(str(tmp_path / "big.jpg"), a)
    fast = read_image(tmp_path / "big.jpg", 256)
    full = fit(decode(tmp_path / "big.jpg"), 256)
    assert fast.shape == (256, 256, 3)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("this is a text file"), "not a readable image"),
    ],
)
def test_broken_files_named(tmp_path, make, reason):
    p = tmp_path / "x.png"
    make(p)
    with pytest.raises(ImageError, match=reason) as e:
        decode(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_truncated_refused(tmp_path, rgb, ext):
    p = tmp_path / f"a{ext}"
    cv2.imwrite(str(p), rgb)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated|not a readable"):
        decode(p)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        decode(tmp_path / "nope.jpg")


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims an enormous size (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_claiming(100_000, 100_000))
    with pytest.raises(ImageError, match="max_pixels"):
        decode(p)


def test_one_pixel_image_upscaled(tmp_path):
    Image.fromarray(np.full((1, 1, 3), 77, np.uint8)).save(tmp_path / "one.png")
    out = read_image(tmp_path / "one.png", 8)
    assert out.shape == (8, 8, 3) and (out == 77).all()


@pytest.mark.parametrize("how, shape", [("stretch", (32, 32)), ("crop", (32, 32)), ("pad", (32, 32))])
def test_fit_modes(rgb, how, shape):
    out = fit(rgb, 32, how)
    assert out.shape[:2] == shape
    if how == "crop":  # centre square of a 48x64 red|blue image: both colours present, halves
        assert out[:, :8, 0].mean() > out[:, :8, 2].mean() and out[:, -8:, 2].mean() > out[:, -8:, 0].mean()


def test_mask_directory_is_union(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    a = np.zeros((8, 8), np.uint8)
    b = a.copy()
    a[0, 0] = 17  # LOCO masks use defect-specific grey values
    b[7, 7] = 255
    cv2.imwrite(str(d / "000.png"), a)
    cv2.imwrite(str(d / "001.png"), b)
    m = read_mask(d)
    assert m[0, 0] == 255 and m[7, 7] == 255 and m.sum() == 2 * 255
