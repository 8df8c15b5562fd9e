"""Normalisation, cropping and augmentation against hand-computed values and numpy references."""

import itertools

import numpy as np
import pytest

from unimedi_jax.data import preprocess, transforms


# ---------------------------------------------------------------- normalisation


def test_normalize_xray_hand_values():
    image = np.array([[0, 255], [51, 128]], np.uint8)
    # (v / 255 - 0.5) / 0.5: 0 -> -1, 255 -> 1, 51 -> (0.2 - 0.5) / 0.5, 128 -> 1/255
    expected = np.array([[-1.0, 1.0], [-0.6, 1.0 / 255.0]])
    out = preprocess.normalize_xray(image)
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_normalize_xray_batch_dims_against_float64():
    image = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 7)).astype(np.uint8)
    expected = (image.astype(np.float64) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(preprocess.normalize_xray(image), expected, rtol=0, atol=1e-6)


def test_normalize_ct_hand_values():
    hu = np.array([-3000, -1000, -250, 0, 500, 1000, 3000], np.int16)
    expected = np.array([-1.0, -1.0, -0.25, 0.0, 0.5, 1.0, 1.0])
    out = preprocess.normalize_ct(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)


def test_normalize_ct_batch_dims_against_float64():
    hu = np.random.default_rng(1).integers(-2000, 3000, (2, 4, 5, 6)).astype(np.int16)
    expected = np.clip(hu.astype(np.float64), -1000, 1000) / 1000.0
    out = preprocess.normalize_ct(hu)
    assert out.shape == hu.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fn, bad", [(preprocess.normalize_xray, np.zeros(3, np.float32)),
                                     (preprocess.normalize_xray, np.zeros(3, np.int16)),
                                     (preprocess.normalize_ct, np.zeros(3, np.float32))])
def test_normalize_rejects_other_dtypes(fn, bad):
    with pytest.raises(TypeError, match="expects"):
        fn(bad)


# ---------------------------------------------------------------- cropping


def test_center_crop_offsets_by_hand():
    x = np.arange(2 * 7 * 10).reshape(2, 7, 10)
    # offsets floor((7 - 4) / 2) = 1, floor((10 - 5) / 2) = 2
    np.testing.assert_array_equal(preprocess.center_crop(x, (4, 5)), x[:, 1:5, 2:7])
    np.testing.assert_array_equal(preprocess.center_crop(x, (2, 7, 10)), x)
    with pytest.raises(ValueError, match="Cannot crop"):
        preprocess.center_crop(x, (8, 5))


def test_preprocess_xray_and_ct_are_crop_then_normalise():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (3, 256, 256)).astype(np.uint8)
    out = preprocess.preprocess_xray(image, 224)
    expected = (image[:, 16:240, 16:240].astype(np.float64) / 255 - 0.5) / 0.5
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)

    volume = rng.integers(-1500, 1500, (2, 36, 20, 18)).astype(np.int16)
    out = preprocess.preprocess_ct(volume, (32, 16, 16))
    expected = np.clip(volume[:, 2:34, 2:18, 1:17].astype(np.float64), -1000, 1000) / 1000
    assert out.shape == (2, 32, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- augmentation


def _find_window(out, full, size):
    """Every (offsets, flipped) whose window of `full` equals `out` exactly."""
    hits = []
    ranges = [range(s - c + 1) for s, c in zip(full.shape, size)]
    for offsets in itertools.product(*ranges):
        window = full[tuple(slice(o, o + c) for o, c in zip(offsets, size))]
        for flipped in (False, True):
            if np.array_equal(out, np.flip(window, -1) if flipped else window):
                hits.append((offsets, flipped))
    return hits


@pytest.mark.parametrize("modality, stored, size", [("xray", (6, 7), (4, 4)),
                                                    ("ct", (4, 5, 6), (2, 4, 4))])
def test_random_crop_and_flip_are_windows_of_the_normalised_input(modality, stored, size):
    """Each output is exactly one window (flipped or not) of normalise(input); over many draws
    every offset and both flips occur; mask and slice rows follow the same geometry."""
    rng = np.random.default_rng(3)
    m = transforms.MODALITIES[modality]
    raw = rng.permutation(np.prod(stored)).reshape(stored)  # distinct values: unique windows
    raw = (raw if modality == "ct" else raw % 251).astype(m.dtype)
    element = {m.key: raw, "labels": np.ones(2, np.float32), "mask": raw.astype(np.uint8)}
    if modality == "ct":
        element["slice_has_finding"] = np.arange(stored[0], dtype=np.uint8)
    augment = transforms.RandomAugment(modality, size, transforms.AugmentOptions(flip_prob=0.5))
    seen = set()
    for seed in range(300):
        out = augment.random_map(element, np.random.default_rng(seed))
        assert out[m.key].dtype == np.float32 and out[m.key].shape == size
        hits = _find_window(out[m.key], m.normalize(raw), size)
        assert len(hits) == 1, hits
        (offsets, flipped), = hits
        window = tuple(slice(o, o + c) for o, c in zip(offsets, size))
        mask = element["mask"][window]
        np.testing.assert_array_equal(out["mask"], np.flip(mask, -1) if flipped else mask)
        if modality == "ct":
            np.testing.assert_array_equal(out["slice_has_finding"],
                                          np.arange(offsets[0], offsets[0] + size[0]))
        np.testing.assert_array_equal(out["labels"], element["labels"])
        seen.add((offsets, flipped))
    n_offsets = np.prod([s - c + 1 for s, c in zip(stored, size)])
    assert len(seen) == 2 * n_offsets


@pytest.mark.parametrize("jitter", [0, 1, 3])
def test_crop_jitter_bounds_the_offsets_around_the_centre_crop(jitter):
    raw = np.random.default_rng(5).permutation(12 * 12).reshape(12, 12).astype(np.uint8)
    options = transforms.AugmentOptions(crop_jitter=jitter)
    augment = transforms.RandomAugment("xray", (6, 6), options)
    seen = set()
    for seed in range(200):
        out = augment.random_map({"image": raw}, np.random.default_rng(seed))["image"]
        (offsets, _), = _find_window(out, preprocess.normalize_xray(raw), (6, 6))
        seen.add(offsets)
    # The centre crop starts at (3, 3); every offset within `jitter` of it per axis occurs.
    expected = {(3 + i, 3 + j) for i in range(-jitter, jitter + 1)
                for j in range(-jitter, jitter + 1)}
    assert seen == expected
    with pytest.raises(ValueError, match="Invalid augmentation"):
        transforms.AugmentOptions(crop_jitter=-1)


def test_flip_equals_np_flip_and_no_flip_by_default():
    raw = np.random.default_rng(4).integers(-1000, 1000, (3, 4, 5)).astype(np.int16)
    flip = transforms.RandomAugment("ct", raw.shape, transforms.AugmentOptions(flip_prob=1.0))
    out = flip.random_map({"volume": raw}, np.random.default_rng(0))["volume"]
    np.testing.assert_array_equal(out, np.flip(preprocess.normalize_ct(raw), -1))
    keep = transforms.RandomAugment("ct", raw.shape, transforms.AugmentOptions())
    out = keep.random_map({"volume": raw}, np.random.default_rng(0))["volume"]
    np.testing.assert_array_equal(out, preprocess.normalize_ct(raw))


def test_augment_options_from_config_fields():
    assert transforms.augment_options(None, "k") is None
    options = transforms.augment_options({"flip_prob": 0.5, "scale_range": [0.9, 1.1]}, "k")
    assert options == transforms.AugmentOptions(flip_prob=0.5, scale_range=(0.9, 1.1))
    with pytest.raises(ValueError, match=r"config.data.augment: unknown .*\['flip'\]"):
        transforms.augment_options({"flip": 0.5}, "config.data.augment")
    with pytest.raises(ValueError, match="config.data.augment: Invalid augmentation"):
        transforms.augment_options({"flip_prob": 2.0}, "config.data.augment")


def _bilinear_reference(image, coords, cval):
    """float64 bilinear sampling of a 2D image at coords (2, ...); cval outside the image."""
    rows, cols = coords
    h, w = image.shape
    inside = (rows >= 0) & (rows <= h - 1) & (cols >= 0) & (cols <= w - 1)
    r0 = np.clip(np.floor(rows), 0, h - 2).astype(int)
    c0 = np.clip(np.floor(cols), 0, w - 2).astype(int)
    fr, fc = rows - r0, cols - c0
    value = ((1 - fr) * (1 - fc) * image[r0, c0] + (1 - fr) * fc * image[r0, c0 + 1]
             + fr * (1 - fc) * image[r0 + 1, c0] + fr * fc * image[r0 + 1, c0 + 1])
    return np.where(inside, value, cval)


def _affine_reference(image, offsets, size, angle_deg, scale, cval):
    """Output o samples image at c_in + R (o - c_out) / scale, R = [[cos, sin], [-sin, cos]]."""
    t = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    c_out = (np.array(size, np.float64) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij")).reshape(2, -1)
    coords = (np.array(offsets)[:, None] + c_out[:, None]
              + rotation @ (grid - c_out[:, None]) / scale)
    return _bilinear_reference(image.astype(np.float64), coords, cval).reshape(size)


def test_affine_window_against_numpy_bilinear():
    rng = np.random.default_rng(5)
    image = rng.standard_normal((20, 23)).astype(np.float32)
    for _ in range(10):
        size = (12, 14)
        offsets = (int(rng.integers(0, 9)), int(rng.integers(0, 10)))
        angle, scale = rng.uniform(-40, 40), rng.uniform(0.7, 1.4)
        out = transforms.window(image, offsets, size, angle_deg=angle, scale=scale, cval=-3.0)
        expected = _affine_reference(image, offsets, size, angle, scale, -3.0)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_affine_direction_rot90_and_volume_slices():
    """90 degrees is np.rot90 of the window (counter-clockwise); volumes rotate slice by slice."""
    rng = np.random.default_rng(6)
    image = rng.standard_normal((9, 10)).astype(np.float32)
    out = transforms.window(image, (1, 3), (6, 6), angle_deg=90.0)
    np.testing.assert_allclose(out, np.rot90(image[1:7, 3:9]), rtol=0, atol=1e-5)

    volume = rng.standard_normal((5, 9, 10)).astype(np.float32)
    angle, scale = 17.0, 1.2
    out = transforms.window(volume, (1, 2, 3), (3, 6, 6), angle_deg=angle, scale=scale, cval=0.5)
    for d in range(3):
        expected = _affine_reference(volume[1 + d], (2, 3), (6, 6), angle, scale, 0.5)
        np.testing.assert_allclose(out[d], expected, rtol=0, atol=1e-5)


def test_augment_affine_uses_background_and_nearest_mask():
    """Rotated corners are filled with the normalised background (X-ray zero padding -> -1);
    the mask is resampled nearest-neighbour, so it keeps only its own labels."""
    raw = np.full((16, 16), 200, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 6:10] = 3
    options = transforms.AugmentOptions(max_rotation_deg=45.0, scale_range=(0.6, 0.6))
    augment = transforms.RandomAugment("xray", 16, options)
    out = augment.random_map({"image": raw, "mask": mask}, np.random.default_rng(7))
    values = np.unique(np.round(out["image"], 5))
    assert values.min() == pytest.approx(-1.0)  # background from shrinking the content
    assert values.max() == pytest.approx(200 / 255 * 2 - 1, abs=1e-5)
    assert set(np.unique(out["mask"])) == {0, 3} and out["mask"].dtype == np.uint8


def test_intensity_jitter_is_an_affine_map_within_bounds():
    raw = np.random.default_rng(8).integers(-1000, 1000, (2, 4, 4)).astype(np.int16)
    options = transforms.AugmentOptions(intensity_scale=0.2, intensity_shift=0.3)
    augment = transforms.RandomAugment("ct", raw.shape, options)
    x = preprocess.normalize_ct(raw).astype(np.float64).ravel()
    gains = []
    for seed in range(20):
        y = augment.random_map({"volume": raw}, np.random.default_rng(seed))["volume"].ravel()
        (gain, shift), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)
        np.testing.assert_allclose(y, gain * x + shift, rtol=0, atol=1e-5)
        assert 0.8 <= gain <= 1.2 and -0.3 <= shift <= 0.3
        gains.append(gain)
    assert np.std(gains) > 0.05


def test_augment_is_deterministic_by_generator():
    raw = np.random.default_rng(9).integers(0, 256, (20, 20)).astype(np.uint8)
    augment = transforms.RandomAugment("xray", 16, transforms.XRAY_AUGMENT)
    a = augment.random_map({"image": raw}, np.random.default_rng(1))["image"]
    b = augment.random_map({"image": raw}, np.random.default_rng(1))["image"]
    c = augment.random_map({"image": raw}, np.random.default_rng(2))["image"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_center_crop_transform_matches_preprocess():
    rng = np.random.default_rng(10)
    volume = rng.integers(-1000, 1000, (6, 9, 9)).astype(np.int16)
    element = {"volume": volume, "slice_has_finding": np.arange(6, dtype=np.uint8),
               "mask": (volume > 0).astype(np.uint8), "labels": np.zeros(1, np.float32)}
    out = transforms.CenterCrop("ct", (4, 5, 5)).map(element)
    np.testing.assert_array_equal(out["volume"], preprocess.preprocess_ct(volume, (4, 5, 5)))
    np.testing.assert_array_equal(out["mask"], element["mask"][1:5, 2:7, 2:7])
    np.testing.assert_array_equal(out["slice_has_finding"], [1, 2, 3, 4])


def test_augment_options_are_validated():
    with pytest.raises(ValueError, match="Invalid augmentation"):
        transforms.AugmentOptions(flip_prob=1.5)
    with pytest.raises(ValueError, match="Unknown modality"):
        transforms.RandomAugment("mri", 4)
    with pytest.raises(ValueError, match="Cannot crop"):
        transforms.RandomAugment("xray", 8).random_map(
            {"image": np.zeros((6, 6), np.uint8)}, np.random.default_rng(0))
