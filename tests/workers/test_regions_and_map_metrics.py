"""Regions of the uploaded image mapped through the preprocessing (``schemas.regions``) and the
map agreement metrics (``workers.explain.map_metrics``)."""

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from schemas.errors import BadImage, BadParams, UnsupportedMedia
from schemas.models import Preprocessing
from schemas.regions import Region, check_region_mask, decode_map, decode_mask, region_mask, resample_map, upload_mask
from tests.helpers import png
from workers.explain import map_metrics as mm
from workers.registry import preprocess

STRETCH = Preprocessing(size=(224, 224), resize="stretch")
CROP = Preprocessing(size=(224, 224), resize="shorter_side_center_crop")


@pytest.mark.parametrize("pre", [STRETCH, CROP], ids=["stretch", "crop"])
@pytest.mark.parametrize(
    "region",
    [{"rect": [100, 40, 330, 250]}, {"circle": [225, 150, 90]}, {"polygon": [[120, 30], [360, 120], [200, 280]]}],
    ids=["rect", "circle", "polygon"],
)
def test_a_region_lands_where_the_preprocessing_puts_its_pixels(pre: Preprocessing, region: dict) -> None:
    """The region drawn into the uploaded image and sent through ``workers.registry.preprocess``
    (the images' own path) covers the same model pixels as the mapped region (bilinear edges
    aside)."""
    r = Region.model_validate(region)
    h0, w0 = 300, 451
    yy, xx = np.mgrid[0:h0, 0:w0] + 0.5
    drawn = region_mask(r, (h0, w0), Preprocessing(size=(h0, w0)))  # identity geometry: the region itself
    assert drawn.shape == (h0, w0)
    if r.rect is not None:
        assert np.array_equal(drawn, (xx >= 100) & (xx < 330) & (yy >= 40) & (yy < 250))
    _, display = preprocess([Image.fromarray((drawn * 255).astype(np.uint8)).convert("RGB")], pre)
    through = display[0][:, :, 0] > 127
    mapped = region_mask(r, (h0, w0), pre)
    assert (through == mapped).mean() > 0.99
    assert np.array_equal(upload_mask(drawn, pre), mapped) or (upload_mask(drawn, pre) == mapped).mean() > 0.995


def test_a_region_outside_the_crop_or_over_everything_is_refused() -> None:
    left_strip = Region(rect=(0, 0, 60, 300))  # a 451x300 image loses 56 px each side to the crop
    assert region_mask(left_strip, (300, 451), STRETCH).any()
    with pytest.raises(BadParams, match="no pixel"):
        check_region_mask(region_mask(left_strip, (300, 451), CROP), "region")
    with pytest.raises(BadParams, match="whole"):
        check_region_mask(region_mask(Region(rect=(56, 0, 400, 300)), (300, 451), CROP), "region")
    with pytest.raises(BadParams, match="no pixel"):
        check_region_mask(region_mask(Region(circle=(900, 900, 5)), (300, 451), STRETCH), "region")


@pytest.mark.parametrize(
    "bad",
    [{"polygon": [[0, 0], [5, 5]]}, {"polygon": [[0, 0], [5, 5], [10, 10]]}, {"rect": [5, 5, 5, 9]},
     {"circle": [3, 3, 0]}, {}, {"rect": [0, 0, 1, 1], "circle": [1, 1, 1]}],
)  # fmt: skip
def test_shapes_that_are_not_regions(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Region.model_validate(bad)


def test_uploaded_masks_and_maps() -> None:
    mask = np.zeros((30, 40), np.uint8)
    mask[5:10, 20:30] = 255
    assert np.array_equal(decode_mask(png(mask), (30, 40)), mask > 0)
    with pytest.raises(BadParams) as e:
        decode_mask(png(mask), (40, 30))
    assert e.value.details["field"] == "signal_mask"
    with pytest.raises(UnsupportedMedia):
        decode_mask(b"this is not an image", (30, 40))
    with pytest.raises(BadImage):
        decode_mask(png(mask)[:60], (30, 40))
    buf = io.BytesIO()
    np.save(buf, np.array([[1.0, np.nan]]))
    with pytest.raises(BadParams, match="NaN"):
        decode_map(buf.getvalue(), "reference")
    assert np.array_equal(decode_map(png(mask), "reference"), mask.astype(np.float64))


def test_a_click_grid_resamples_onto_the_model_input() -> None:
    clicks = np.zeros((20, 20))
    clicks[0:10, :] = 1.0  # the upper half of the image
    out = resample_map(clicks, (300, 300), Preprocessing(size=(224, 224)))
    assert out.shape == (224, 224)
    assert out[:100].min() == pytest.approx(1.0) and out[124:].max() == pytest.approx(0.0)


# --- map metrics: by hand, and against SciPy / scikit-learn -------------------------------------


def test_metrics_by_hand() -> None:
    a = np.arange(16.0).reshape(4, 4)
    assert mm.pearson(a, a) == pytest.approx(1.0) and mm.pearson(a, -a) == pytest.approx(-1.0)
    assert mm.spearman(a, a**3) == pytest.approx(1.0)
    assert mm.pearson(a, np.ones_like(a)) is None
    assert mm.top_iou(a, a, 0.25) == 1.0 and mm.top_iou(a, -a, 0.25) == 0.0
    assert mm.top_mask(a, 0.25).sum() == 4 and mm.top_mask(a, 0.25)[3].all()
    assert mm.auc(a, a >= 8) == 1.0 and mm.auc(-a, a >= 8) == 0.0
    assert mm.pointing_game(a, a == 15) and not mm.pointing_game(a, a == 0)
    region = np.zeros((4, 4), bool)
    region[:2] = True
    m = np.where(region, 2.0, 1.0)
    stats = mm.mass_inside(m, region)
    assert stats["density_ratio"] == pytest.approx(2.0) and stats["positive_share_inside"] == pytest.approx(2 / 3)
    assert stats["area_fraction"] == 0.5


def test_metrics_against_references() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((20, 20)), rng.random((20, 20))
    b = a + 0.5 * b
    assert mm.pearson(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert mm.spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic)
    positives = mm.top_mask(b, 0.2)
    assert mm.auc(a, positives) == pytest.approx(roc_auc_score(positives.ravel(), a.ravel()))
