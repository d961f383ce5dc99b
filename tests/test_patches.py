"""Patch geometry: physical size in µm, centring, border fill, resampling."""

import numpy as np
import pytest

from workflow_scripts.data.patches import ArraySlide, cut_patch, patch_reader, patch_size_px


def test_patch_size_from_microns():
    assert patch_size_px(200, 0.5) == 400
    assert patch_size_px(224, 1.0) == 224
    with pytest.raises(ValueError):
        patch_size_px(0, 1.0)


def test_cut_patch_is_centred_and_white_filled_outside():
    img = np.zeros((100, 100, 3), np.uint8)
    img[40:60, 40:60] = 200  # a bright square centred at (50, 50)
    slide = ArraySlide(img)
    p = cut_patch(slide, 50, 50, 20, out_px=20)
    assert (p == 200).all()
    corner = cut_patch(slide, 0, 0, 20, out_px=20)
    assert (corner[:10, :10] == 255).all() and (corner[10:, 10:] == 0).all()


def test_resampled_to_out_px():
    slide = ArraySlide(np.full((500, 500, 3), 7, np.uint8))
    p = cut_patch(slide, 250, 250, 300, out_px=224)
    assert p.shape == (224, 224, 3) and p.dtype == np.uint8 and (p == 7).all()


def test_patch_reader_reads_the_spot_pixels(tiny_spots):
    r = patch_reader(tiny_spots, patch_um=40, out_px=10)  # 40 µm at 4 µm/px = 10 px
    i = 7
    p = r[i]
    from PIL import Image

    img = np.asarray(Image.open(tiny_spots.uns["slides"]["S1"]["image_path"]).convert("RGB"))
    x, y = tiny_spots.obs[["px_x", "px_y"]].iloc[i].astype(int)
    np.testing.assert_array_equal(p, img[y - 5 : y + 5, x - 5 : x + 5])
    order = r.order()
    assert (np.diff(tiny_spots.obs["slide"].cat.codes.to_numpy()[order]) >= 0).all()
