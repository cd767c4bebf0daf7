"""The digits classifier metric: accuracy, Frechet distance separation, caching, digits_quality."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdit import create_model
from maskdit import digits_metric as dm


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh cache directory, selected through $MASKDIT_CACHE; the classifier is trained into it once."""
    path = str(tmp_path_factory.mktemp("maskdit-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASKDIT_CACHE", path)
        dm._LOADED.clear()
        dm.load_classifier()
        yield path
    dm._LOADED.clear()


@pytest.fixture(scope="module")
def heldout():
    return dm.heldout_digits()


def noise_images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"uniform": torch.rand(n, 1, 16, 16, generator=g) * 2 - 1,
            "gaussian": torch.randn(n, 1, 16, 16, generator=g).clamp(-1, 1)}


def test_cache_location_and_heldout_accuracy(cache_dir):
    assert dm.cache_path() == os.path.join(cache_dir, f"digits_classifier-{dm.VERSION}.pt")
    assert os.path.isfile(dm.cache_path())
    assert dm.cache_path("/some/dir") == os.path.join("/some/dir", f"digits_classifier-{dm.VERSION}.pt")
    assert dm.load_classifier().heldout_accuracy >= 0.97


def test_cache_is_reused(cache_dir, monkeypatch):
    path = dm.cache_path()
    mtime = os.stat(path).st_mtime_ns
    before = dm.load_classifier().state_dict()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded, not retrained")

    monkeypatch.setattr(dm, "train_classifier", no_training)
    monkeypatch.setattr(dm, "_LOADED", {})
    model = dm.load_classifier(cache_dir)  # from the file this time
    assert os.stat(path).st_mtime_ns == mtime
    assert model.heldout_accuracy >= 0.97
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_other_version_retrains(tmp_path, monkeypatch):
    path = os.path.join(str(tmp_path), f"digits_classifier-{dm.VERSION}.pt")
    torch.save({"version": "v0", "state_dict": {}, "heldout_accuracy": 1.0}, path)
    calls = []

    def fake_training():
        calls.append(1)
        return dm.DigitsClassifier().eval()

    monkeypatch.setattr(dm, "train_classifier", fake_training)
    monkeypatch.setattr(dm, "_LOADED", {})
    dm.load_classifier(str(tmp_path))
    assert calls == [1]
    assert torch.load(path, weights_only=True)["version"] == dm.VERSION
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []  # the atomic write cleaned up


def test_features_and_predictions(cache_dir, heldout):
    images, labels = heldout
    feats = dm.features(images)
    assert feats.shape == (len(images), dm.FEATURE_DIM) and feats.dtype == torch.float32
    pred = dm.predict(images)
    assert pred.shape == labels.shape and pred.dtype == torch.int64
    assert dm.class_accuracy(images, labels) >= 0.97
    for name, noise in noise_images(len(images)).items():
        assert abs(dm.class_accuracy(noise, labels) - 0.1) < 0.1, name


def test_other_sizes_resized_and_bad_shapes_rejected(cache_dir, heldout):
    images, labels = heldout
    big = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    assert dm.class_accuracy(big, labels) >= 0.95
    assert dm.class_accuracy(images.numpy(), labels) >= 0.97  # numpy arrays are accepted
    for bad in (images.repeat(1, 3, 1, 1), images[:, 0]):
        with pytest.raises(ValueError, match="single-channel"):
            dm.features(bad)


def test_frechet_distance_separates_real_from_noise(cache_dir, heldout):
    images, _ = heldout
    ref = dm.reference_statistics()
    assert ref[0].shape == (dm.FEATURE_DIM,) and ref[1].shape == (dm.FEATURE_DIM, dm.FEATURE_DIM)
    real = dm.digits_fd(images)
    assert 0 <= real < 10
    g = torch.Generator().manual_seed(2)
    fakes = dict(noise_images(len(images)))
    fakes["blurred"] = F.avg_pool2d(F.pad(images, (2, 2, 2, 2), value=-1.0), 5, stride=1)
    fakes["shuffled pixels"] = images.flatten(1)[:, torch.randperm(256, generator=g)].reshape_as(images)
    for name, fake in fakes.items():
        assert dm.digits_fd(fake) >= 10 * real, name


def test_frechet_distance_matches_closed_forms():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    assert dm.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 4 + 9 - 2 * 6)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) * 2 + 0.5
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert dm.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert dm.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_digits_quality_on_a_tiny_untrained_model(cache_dir):
    model = create_model("MaskDiT-T/2", input_size=16, in_channels=1, num_classes=10).train()
    out = dm.digits_quality(model, num_per_class=2, steps=2)
    assert set(out) == {"digits_fd", "class_accuracy", "num_samples"}
    assert out["num_samples"] == 20
    assert math.isfinite(out["digits_fd"]) and out["digits_fd"] >= 0
    assert 0 <= out["class_accuracy"] <= 1
    assert model.training  # restored
    model.eval()
    one = dm.digits_quality(model, num_per_class=1, steps=1)
    assert not model.training  # restored
    split = dm.digits_quality(model, num_per_class=1, steps=1, batch_size=3)  # the noise is batch independent
    assert split["num_samples"] == 10
    assert split["digits_fd"] == pytest.approx(one["digits_fd"], rel=1e-4)
    with pytest.raises(ValueError, match="in_channels=1"):
        dm.digits_quality(create_model("DiT-T/2", input_size=16, in_channels=3, num_classes=10))


def test_split_holds_out_a_fifth_with_no_overlap():
    train, held = dm.split_indices(1797)
    assert (len(train), len(held)) == (1438, 359)
    assert sorted(torch.cat([train, held]).tolist()) == list(range(1797))


def test_training_shifts_cover_the_range_and_fill_with_background():
    """The classifier's augmentation moves each image by -max..max pixels on each axis (every offset drawn,
    none beyond), the uncovered border filled with the background value -1."""
    n, m = 600, 2
    x = torch.full((n, 1, 8, 8), -1.0)
    x[:, 0, 3, 4] = 1.0  # one bright pixel
    out = dm._random_shift(x, m, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert set(out.unique().tolist()) == {-1.0, 1.0} and (out == 1.0).sum((1, 2, 3)).eq(1).all()
    where = (out[:, 0] == 1.0).nonzero()[:, 1:]  # (row, col) of the pixel in each image
    offsets = {(int(r) - 3, int(c) - 4) for r, c in where}
    assert offsets == {(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)}
    edge = torch.linspace(-0.9, 0.9, 64).view(1, 1, 8, 8)  # no -1 inside: a -1 in the output is the fill
    shifted = dm._random_shift(edge.repeat(50, 1, 1, 1), m, torch.Generator().manual_seed(1))
    assert (shifted == -1.0).any() and ((shifted == -1.0) | (shifted.abs() <= 0.9)).all()


def test_images_slightly_outside_the_range_are_clamped_other_scales_refused(cache_dir, heldout):
    """Samples a little beyond [-1, 1] are clamped as when written as images; 0..255 pixels (integer or float),
    non-finite values and labels of another shape are refused instead of scored as garbage (NaN images used
    to count as class 0, (N, 1) labels to broadcast)."""
    images, labels = heldout
    loud = images[:50] * 1.3
    torch.testing.assert_close(dm.features(loud), dm.features(loud.clamp(-1, 1)))
    assert not torch.allclose(dm.features(loud), dm.features(images[:50]))
    pixels = ((images + 1) * 127.5).round()
    with pytest.raises(ValueError, match=r"expected float images in \[-1, 1\], got torch.uint8"):
        dm.predict(pixels.to(torch.uint8))
    with pytest.raises(ValueError, match=r"expected images in \[-1, 1\], got values in \[0, 255\]"):
        dm.digits_fd(pixels)
    nan = images[:4].clone()
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="the images hold 1 non-finite values"):
        dm.class_accuracy(nan, labels[:4])
    for bad in (labels[:, None], labels[:1], labels[:-1]):
        with pytest.raises(ValueError, match=rf"labels of shape \({len(images)},\)"):
            dm.class_accuracy(images, bad)
    with pytest.raises(ValueError, match="at least one image"):
        dm.class_accuracy(images[:0], labels[:0])


def test_digits_quality_refuses_non_finite_samples(cache_dir):
    model = create_model("MaskDiT-T/2", input_size=16, in_channels=1, num_classes=10)
    with torch.no_grad():
        model.final_layer.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="digits_quality: 20 of 20 samples hold non-finite values"):
        dm.digits_quality(model, num_per_class=2, steps=1)
