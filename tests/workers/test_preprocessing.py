"""Preprocessing of uploads: the built-in EfficientNet-Lite models' published centre crop and
(x - 127) / 128, ``stretch`` as a choice, and the region of the upload each input covers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from schemas.models import ModelManifest, Preprocessing
from workers.registry import (
    crop_box,
    efficientnet_preprocessing,
    input_region,
    prepare_builtin_models,
    preprocess,
)


def tf_center_crop_window(height: int, width: int, image_size: int) -> tuple[int, int, int]:
    """TensorFlow's EfficientNet evaluation crop (``preprocessing._decode_and_center_crop``,
    CROP_PADDING = 32), float32 as TF computes it: ``(offset_height, offset_width, side)``."""
    side = int(np.float32(image_size / (image_size + 32)) * np.float32(min(height, width)))
    return (height - side + 1) // 2, (width - side + 1) // 2, side


def test_builtin_models_use_the_published_preprocessing(models_dir):
    for model_id, size in (("efficientnet-lite0", 224), ("efficientnet-lite1", 240)):
        pre = ModelManifest.model_validate_json((models_dir / model_id / "manifest.json").read_text()).preprocessing
        assert pre == efficientnet_preprocessing(size)
        assert (pre.resize, pre.interpolation, pre.scale) == ("shorter_side_center_crop", "bicubic", 1.0)
        assert pre.crop_fraction == pytest.approx(size / (size + 32)) and pre.mean == [127.0] * 3
        assert pre.std == [128.0] * 3


@pytest.mark.parametrize("size", [224, 240])
def test_crop_window_equals_tensorflows_on_many_shapes(size):
    """The reference: TF's own formula, in float32, on 500 random upload shapes."""
    rng = np.random.default_rng(0)
    pre = efficientnet_preprocessing(size)
    for height, width in rng.integers(1, 5000, (500, 2)):
        top, left, side = tf_center_crop_window(int(height), int(width), size)
        assert crop_box(int(width), int(height), pre) == (left, top, left + max(side, 1), top + max(side, 1))


def test_the_centre_crop_by_hand():
    """chelsea's shape, 451 x 300: the 224 model sees the centred 262 x 262 square (262 = 0.875
    x 300, left (451 - 262 + 1) // 2 = 95, top 19). An image green inside that square and red
    outside becomes all green; stretched, it keeps its red borders. Pixel 255 is (255 - 127) /
    128 = 1 after normalisation, 0 is -127/128."""
    pre = efficientnet_preprocessing(224)
    assert crop_box(451, 300, pre) == (95, 19, 357, 281)
    assert input_region(451, 300, pre) == {
        "left": 95, "top": 19, "width": 262, "height": 262, "resize": "shorter_side_center_crop"
    }
    img = np.zeros((300, 451, 3), np.uint8)
    img[..., 0] = 255
    img[19:281, 95:357] = (0, 255, 0)
    x, display = preprocess([Image.fromarray(img)], pre)
    assert x.shape == (1, 3, 224, 224)
    assert (display[0] == (0, 255, 0)).all()
    np.testing.assert_array_equal(x[0, 1].numpy(), 1.0)
    np.testing.assert_array_equal(x[0, 0].numpy(), -127 / 128)
    stretch = pre.model_copy(update={"resize": "stretch"})
    assert input_region(451, 300, stretch) == {"left": 0, "top": 0, "width": 451, "height": 300, "resize": "stretch"}
    _, whole = preprocess([Image.fromarray(img)], stretch)
    assert (whole[0][:, :5] == (255, 0, 0)).all() and (whole[0][112, 112] == (0, 255, 0)).all()


def test_non_square_input_keeps_its_aspect_ratio():
    """A 4 x 8 (H x W) input from a 100 x 100 upload: the centred 100 x 50 band; with
    crop_fraction 0.5, the centred 50 x 25."""
    pre = Preprocessing(size=(4, 8), resize="shorter_side_center_crop")
    assert crop_box(100, 100, pre) == (0, 25, 100, 75)
    assert crop_box(100, 100, pre.model_copy(update={"crop_fraction": 0.5})) == (25, 38, 75, 63)


def test_stretched_builtin_manifests_are_migrated_and_edited_ones_kept(models_dir, tmp_path):
    """A models directory prepared before: the old default (stretch) becomes the published
    crop (only the manifest is rewritten: the weights, so the version, stay); a manifest a
    user edited otherwise stays as it is."""
    for model_id, edit in (("efficientnet-lite0", None), ("efficientnet-lite1", {"size": [260, 260]})):
        d = tmp_path / model_id
        d.mkdir()
        manifest = json.loads((models_dir / model_id / "manifest.json").read_text())
        size = manifest["preprocessing"]["size"][0]
        manifest["preprocessing"] = {"size": [size, size], "mean": [127.0] * 3, "std": [128.0] * 3, "scale": 1.0}
        manifest["preprocessing"].update(edit or {})
        (d / "manifest.json").write_text(json.dumps(manifest))
    assert prepare_builtin_models(tmp_path, only=["efficientnet-lite0", "efficientnet-lite1"]) == []
    lite0 = ModelManifest.model_validate_json((tmp_path / "efficientnet-lite0" / "manifest.json").read_text())
    assert lite0.preprocessing == efficientnet_preprocessing(224)
    lite1 = ModelManifest.model_validate_json((tmp_path / "efficientnet-lite1" / "manifest.json").read_text())
    assert lite1.preprocessing.resize == "stretch" and lite1.preprocessing.size == (260, 260)
