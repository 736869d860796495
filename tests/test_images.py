"""exits.data.images: the one image reader and the one image-path rule of every stage."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from exits.data.images import ImagePathError, ImageReadError, decode_check, image_file, read_rgb


def test_16_bit_grey_png_is_scaled_to_8_bits_not_clipped_white(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # PIL keeps 16 bits: convert("RGB") would clip at 255
        clipped = np.asarray(im.convert("RGB"))
        assert (clipped == 255).mean() > 0.99  # the bug this reader avoids: all but the darkest are white
    rgb = read_rgb(path)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    assert rgb.min() == 0 and rgb.max() == 255


def test_8_bit_images_read_as_pil_convert_rgb(tmp_path):
    arr = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr[..., 0]).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "a.png"), arr)
    np.testing.assert_array_equal(read_rgb(tmp_path / "g.png"), np.repeat(arr[..., :1], 3, axis=2))


def test_truncated_jpeg_passes_verify_but_not_decode_check(tmp_path):
    arr = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    path = tmp_path / "t.jpg"
    Image.fromarray(arr).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:1500])
    with Image.open(path) as im:
        im.verify()  # what validation used to rely on
    with pytest.raises(ImageReadError, match="t.jpg"):
        decode_check(path)
    with pytest.raises(ImageReadError, match="t.jpg"):
        read_rgb(path)
    Image.fromarray(arr).save(tmp_path / "ok.png")
    assert decode_check(tmp_path / "ok.png") == (64, 64)


def test_float_image_is_refused_with_a_reason(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ImageReadError, match="mode F"):
        read_rgb(tmp_path / "f.tif")
    with pytest.raises(ImageReadError, match="mode F"):
        decode_check(tmp_path / "f.tif")


def test_image_file_keeps_names_inside_the_folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(root / "sub" / "a.png", root / "inside_link.png")
    os.symlink(tmp_path / "secret.png", root / "outside_link.png")
    assert image_file(root, "sub/a.png") == root / "sub" / "a.png"
    assert image_file(root, "sub/../sub/a.png") == root / "sub/../sub/a.png"
    assert image_file(root, "inside_link.png") == root / "inside_link.png"
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "outside_link.png", "sub/../../secret.png", ""):
        with pytest.raises(ImagePathError) as err:
            image_file(root, bad)
        assert err.value.reason == "outside_image_dir"
