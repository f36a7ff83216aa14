"""Data sets: digits, image folders, .npz files, and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from ipfm_fast.data import DataError, load_dataset, load_images, save_grid

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster



def test_digits_split_and_range():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert a.shape == [1, 8, 8] and a.num_classes == 10
    x = a.train.floats()
    assert x.min() == -1.0 and x.max() == 1.0 and x.dtype == torch.float32
    assert torch.equal(a.test.images, b.test.images) and a.fingerprint() == b.fingerprint()
    assert torch.equal(a.train.floats(torch.tensor([3, 1])), x[[3, 1]])


def _png(path, size, value=128, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(size[::-1] + ((3,) if mode == "RGB" else ()), value, np.uint8)
    if mode == "RGB":
        arr[..., 0] = 255 - value  # a colour image
    Image.fromarray(arr, mode).save(path)


def test_folder_with_class_subfolders(tmp_path):
    for c in ("cat", "dog"):
        for i in range(5):
            _png(tmp_path / c / f"{i}.png", (6, 4), value=10 * i)
    ds = load_dataset(tmp_path, test_fraction=0.2)
    assert ds.shape == [1, 4, 6] and (len(ds.train), len(ds.test)) == (8, 2) and ds.num_classes == 2
    assert ds.train.floats().min() >= -1 and ds.train.floats().max() <= 1


def test_folder_colour_and_jpeg(tmp_path):
    _png(tmp_path / "a.png", (4, 4), mode="RGB")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.JPG")
    _png(tmp_path / "c.png", (4, 4))
    ds = load_dataset(tmp_path, test_fraction=0.4)
    assert ds.shape == [3, 4, 4] and len(ds.train) + len(ds.test) == 3 and ds.num_classes == 0


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG/JPEG"):
        load_dataset(tmp_path / "empty")
    _png(tmp_path / "mixed" / "a.png", (4, 4))
    _png(tmp_path / "mixed" / "b.png", (5, 4))
    with pytest.raises(DataError, match="mixed sizes.*b.png"):
        load_dataset(tmp_path / "mixed")
    (tmp_path / "bad").mkdir()
    _png(tmp_path / "bad" / "ok.png", (4, 4))
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png: cannot read"):
        load_dataset(tmp_path / "bad")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not an .npz"):
        load_dataset(tmp_path / "notes.txt")


def test_npz_layouts_and_split(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=nhwc, y=np.arange(20) % 4)
    ds = load_dataset(tmp_path / "a.npz", test_fraction=0.25)
    assert ds.shape == [3, 4, 4] and (len(ds.train), len(ds.test)) == (15, 5) and ds.num_classes == 4
    np.savez(tmp_path / "b.npz", x_train=nhwc[:12].transpose(0, 3, 1, 2), x_test=nhwc[12:].transpose(0, 3, 1, 2))
    ds = load_dataset(tmp_path / "b.npz")
    assert (len(ds.train), len(ds.test)) == (12, 8)
    torch.testing.assert_close(ds.test.floats()[0], torch.from_numpy(nhwc[12]).permute(2, 0, 1).float() / 127.5 - 1)
    np.savez(tmp_path / "gray.npz", images=nhwc[..., 0])
    assert load_dataset(tmp_path / "gray.npz").shape == [1, 4, 4]
    assert load_images(tmp_path / "gray.npz").shape == (20, 1, 4, 4)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((4, 4, 4), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(tmp_path / "f.npz")
    np.savez(tmp_path / "k.npz", foo=np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(DataError, match="no image array"):
        load_dataset(tmp_path / "k.npz")
    np.savez(tmp_path / "s.npz", x=np.zeros((4, 4, 4, 4, 4), np.uint8))
    with pytest.raises(DataError, match="expected images"):
        load_dataset(tmp_path / "s.npz")
    (tmp_path / "c.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(tmp_path / "c.npz")


def test_save_grid(tmp_path):
    path = save_grid(torch.rand(10, 1, 8, 8) * 2 - 1, tmp_path / "g" / "grid.png", nrow=5)
    im = Image.open(path)
    assert im.width >= 256 and im.mode == "L"
