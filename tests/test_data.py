import numpy as np
import pytest
import torch
from PIL import Image

from maskdit.data import (
    DigitsDataset,
    EpochBatchSampler,
    ImageFolderDataset,
    batch_iterator,
    center_crop_resize,
    make_dataset,
)


def test_digits():
    d = DigitsDataset(16)
    assert len(d) == 1797 and d.num_classes == 10 and d.channels == 1
    assert d.images.shape == (1797, 1, 16, 16)
    assert d.images.min() == -1 and d.images.max() == 1
    assert sorted(d.labels.unique().tolist()) == list(range(10))
    native = DigitsDataset(8)
    from sklearn.datasets import load_digits
    np.testing.assert_allclose(native.images[:, 0].numpy(), load_digits().images / 8 - 1, atol=1e-6)


def test_sampler_shuffles_per_epoch_and_resumes():
    s = EpochBatchSampler(10, 3, seed=1)
    it = iter(s)
    stream = [next(it) for _ in range(9)]  # 3 batches per epoch, the last item of each epoch dropped
    epochs = [sum(stream[i:i + 3], []) for i in (0, 3, 6)]
    assert all(len(set(e)) == 9 for e in epochs)
    assert epochs[0] != epochs[1]
    assert epochs[0] != list(range(9))  # shuffled, not in dataset order
    resumed = iter(EpochBatchSampler(10, 3, seed=1, start_batch=4))
    assert [next(resumed) for _ in range(5)] == stream[4:]
    assert next(iter(EpochBatchSampler(10, 3, seed=2))) != stream[0]


def test_batch_iterator_digits():
    d = DigitsDataset(8)
    x, y = next(batch_iterator(d, 32, seed=0))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,) and y.dtype == torch.int64
    flat = d.images.flatten(1)
    for xi, yi in zip(x.flatten(1), y):  # each image comes with its own label
        assert yi.item() in d.labels[(flat == xi).all(1)].tolist()


def test_batch_iterator_keeps_images_with_their_labels(tmp_path):
    for name, value in (("black", 0), ("white", 255)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / name / f"{i}.png")
    x, y = next(batch_iterator(make_dataset(str(tmp_path), 8), 6, seed=0))
    assert torch.equal((x.mean((1, 2, 3)) > 0).long(), y)  # class 1 ("white") exactly at the white images


def _write_images(root, classes=("cat", "dog"), per=3, size=(20, 13)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder(tmp_path):
    _write_images(tmp_path)
    d = make_dataset(str(tmp_path), 8)
    assert isinstance(d, ImageFolderDataset)
    assert d.class_names == ["cat", "dog"] and len(d) == 6 and d.num_classes == 2
    x, y = d[4]
    assert x.shape == (3, 8, 8) and y.item() == 1
    assert x.min() >= -1 and x.max() <= 1
    before = torch.get_rng_state()
    xb, yb = next(batch_iterator(d, 4, seed=0))
    assert xb.shape == (4, 3, 8, 8)
    assert torch.equal(torch.get_rng_state(), before)  # (checkpoints save that state: the loader leaves it alone)


def test_center_crop_keeps_the_centre(tmp_path):
    img = np.zeros((10, 30, 3), dtype=np.uint8)
    img[:, 10:20] = 255  # a white centre square in a wide black image
    (tmp_path / "a").mkdir()
    Image.fromarray(img).save(tmp_path / "a" / "x.png")
    x, _ = ImageFolderDataset(str(tmp_path), 10)[0]
    assert x.min() > 0.9  # only the centre square survives the crop


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_dataset(str(tmp_path / "missing"), 8)
    with pytest.raises(ValueError, match="no class sub-folders"):
        make_dataset(str(tmp_path), 8)
    _write_images(tmp_path)
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        make_dataset(str(tmp_path), 8)


def test_a_truncated_image_fails_by_name_when_read(tmp_path):
    """A JPEG cut short passes the header check at start; reading its item names it (a ValueError, not PIL's bare
    OSError from inside a loader)."""
    _write_images(tmp_path)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "dog" / "z.jpg", quality=95)
    data = (tmp_path / "dog" / "z.jpg").read_bytes()
    (tmp_path / "dog" / "z.jpg").write_bytes(data[:len(data) // 2])
    d = make_dataset(str(tmp_path), 8)
    with pytest.raises(ValueError, match=r"corrupt or unreadable image file .*z.jpg.*truncated"):
        d[d.files.index(str(tmp_path / "dog" / "z.jpg"))]


def test_center_crop_box_downsamples_at_exactly_twice_the_size():
    """ADM's crop halves with a box filter while the short side is >= 2 x size: 80x64 at 32 is halved to 40x32
    (the bicubic step is then a no-op), then cropped in the middle."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    expected = np.asarray(img.resize((40, 32), Image.BOX))[:, 4:36]
    np.testing.assert_array_equal(center_crop_resize(img, 32), expected)


def test_image_folder_classes_are_its_visible_folders_with_images(tmp_path):
    """Hidden folders (.ipynb_checkpoints, ...) are no classes; a class folder without images is refused by name
    (it would take a label and shift the classes after it); a file is no dataset folder."""
    _write_images(tmp_path, classes=("cat", "dog", ".ipynb_checkpoints"))
    assert make_dataset(str(tmp_path), 8).class_names == ["cat", "dog"]
    (tmp_path / "emu").mkdir()
    (tmp_path / "emu" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['emu'\] hold no images"):
        make_dataset(str(tmp_path), 8)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        make_dataset(str(tmp_path / "emu" / "readme.txt"), 8)
