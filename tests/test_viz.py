"""contact_sheet: a labelled grid that any stage can use for its figures."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid.viz import contact_sheet


def test_grid_layout_and_placement():
    red = np.zeros((20, 40, 3), np.uint8)
    red[..., 0] = 255
    gray = np.full((10, 10), 0.5, np.float32)  # float 0..1 and single-channel images work too
    sheet = contact_sheet([red, gray, red], labels=None, cols=2, cell=40, pad=4)
    # 2 columns of 40 px + padding; rows as tall as the tallest image at that width (40 px)
    assert sheet.shape == (2 * (40 + 4) + 4, 2 * (40 + 4) + 4, 3) and sheet.dtype == np.uint8
    assert tuple(sheet[4 + 20, 4 + 20]) == (255, 0, 0)  # red, centred in the first cell
    assert tuple(sheet[4 + 20, 48 + 20]) == (128, 128, 128)  # the gray image, scaled up
    assert tuple(sheet[4 + 2, 4 + 20]) == (255, 255, 255)  # letterbox above the wide image
    assert (sheet[48:, 48:] == 255).all()  # the empty fourth cell


def test_labels_are_drawn_under_the_images():
    img = np.zeros((30, 60, 3), np.uint8)
    plain = contact_sheet([img], None, cols=1, cell=120)
    labelled = contact_sheet([img], ["lativitta"], cols=1, cell=120)
    assert labelled.shape[0] > plain.shape[0]
    strip = labelled[plain.shape[0] - 4:]
    assert (strip < 128).any()  # dark text in the label strip


def test_bad_inputs_name_the_problem():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        contact_sheet([img, img], ["a"], cols=2, cell=16)
    with pytest.raises(ValueError, match="image 1 has shape"):
        contact_sheet([img, np.zeros((8, 8, 5), np.uint8)], None, cols=2, cell=16)
    with pytest.raises(ValueError, match="no images"):
        contact_sheet([], None, cols=2, cell=16)
