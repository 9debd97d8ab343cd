"""Small image helpers for figures: a labelled grid of images (a contact sheet)."""

from __future__ import annotations

import math

import cv2
import numpy as np


def _to_rgb_uint8(image: np.ndarray, index: int) -> np.ndarray:
    """uint8 RGB from uint8/bool/float (floats are taken as 0..1) gray or RGB(A) arrays."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(
            f"contact_sheet: image {index} has shape {a.shape}; expected (H,W), (H,W,1), "
            "(H,W,3) or (H,W,4)"
        )
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(
            f"contact_sheet: image {index} has dtype {a.dtype}; pass uint8, bool or float in 0..1"
        )
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def contact_sheet(
    images: list[np.ndarray],
    labels: list[str] | None = None,
    cols: int = 6,
    cell: int = 192,
    pad: int = 4,
    background: int = 255,
) -> np.ndarray:
    """Lay ``images`` out in a grid of ``cols`` columns, each with its label underneath.

    Every cell is ``cell`` pixels wide; its image area is as tall as the tallest image needs at
    that width, and each image is scaled to fit (aspect kept) and centred. Returns uint8 RGB.
    """
    if not images:
        raise ValueError("contact_sheet: no images given")
    if labels is not None and len(labels) != len(images):
        raise ValueError(
            f"contact_sheet: {len(images)} images but {len(labels)} labels; give one label each"
        )
    if cols < 1 or cell < 8:
        raise ValueError(f"contact_sheet: cols={cols}, cell={cell}; need cols >= 1, cell >= 8")
    rgb = [_to_rgb_uint8(im, i) for i, im in enumerate(images)]
    img_h = max(math.ceil(cell * im.shape[0] / im.shape[1]) for im in rgb)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.3, cell / 400)
    text_h = cv2.getTextSize("Ag", font, scale, 1)[0][1] + 8 if labels is not None else 0
    rows = math.ceil(len(rgb) / cols)
    cw, ch = cell + pad, img_h + text_h + pad
    sheet = np.full((rows * ch + pad, cols * cw + pad, 3), background, np.uint8)
    for i, im in enumerate(rgb):
        x0, y0 = pad + (i % cols) * cw, pad + (i // cols) * ch
        k = min(cell / im.shape[1], img_h / im.shape[0])
        w, h = max(1, round(im.shape[1] * k)), max(1, round(im.shape[0] * k))
        interp = cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
        small = cv2.resize(im, (w, h), interpolation=interp)
        ox, oy = x0 + (cell - w) // 2, y0 + (img_h - h) // 2
        sheet[oy : oy + h, ox : ox + w] = small
        if labels is not None:
            text = str(labels[i])
            while text and cv2.getTextSize(text, font, scale, 1)[0][0] > cell:
                text = text[:-1]
            tw = cv2.getTextSize(text, font, scale, 1)[0][0]
            org = (x0 + (cell - tw) // 2, y0 + img_h + text_h - 5)
            cv2.putText(sheet, text, org, font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet
