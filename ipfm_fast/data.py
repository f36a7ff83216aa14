"""Data sets as in-memory image tensors in [-1, 1], split deterministically into train/test.

Sources (``load_dataset(spec)``):

- ``"digits"``: scikit-learn's digits (1,797 images of 8x8, shipped inside scikit-learn,
  no download), values 0..16 mapped to [-1, 1]; 1,437 train / 360 test images.
- a folder of PNG/JPEG files (searched recursively). Labels, if the folder has one
  sub-folder per class, come from the sub-folder names (used by the metrics' classifier).
- an ``.npz`` file of uint8 images: arrays ``x_train``/``x_test`` (then that split is
  used), or one of ``x``, ``images``, ``arr_0``; layout [N, H, W], [N, H, W, C] or
  [N, C, H, W]; optional labels ``y_train``/``y_test``, ``y`` or ``labels``.

Without a given split, the last ``test_fraction`` of a fixed permutation (seed 0) is the
test split. Images are kept as uint8 (4x less memory than float32) and converted per batch.
"""

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ipfm_fast._files import replacing
from ipfm_fast.errors import BadFile, InvalidInput, MissingFile

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DIGITS_TEST = 360
SPLIT_SEED = 0


class DataError(BadFile):
    """A data source that cannot be used; the message says which file and why."""


@dataclass
class Split:
    """Images [n, C, H, W] stored as integers; :meth:`floats` maps them to [-1, 1]."""

    images: torch.Tensor
    labels: torch.Tensor | None
    scale: float
    offset: float = -1.0

    def __len__(self):
        return self.images.shape[0]

    def floats(self, index=None, device=None):
        x = self.images if index is None else self.images[index]
        if device is not None:
            x = x.to(device, non_blocking=True)
        return x.float() * self.scale + self.offset

    def to(self, device):
        labels = None if self.labels is None else self.labels.to(device)
        return Split(self.images.to(device), labels, self.scale, self.offset)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int = 0
    info: dict = field(default_factory=dict)

    @property
    def shape(self):
        """One image's shape [C, H, W]."""
        return list(self.train.images.shape[1:])

    def fingerprint(self):
        """Short hash of both splits (the metrics' classifier cache is keyed on it; model files
        record it). Computed once."""
        if "fingerprint" not in self.info:
            h = hashlib.sha256()
            for s in (self.train, self.test):
                h.update(s.images.cpu().contiguous().numpy().tobytes())
                h.update(str(s.scale).encode())
            self.info["fingerprint"] = h.hexdigest()[:16]
        return self.info["fingerprint"]

    def identity(self):
        """What a model file records about its training data (to check it against later)."""
        return {"name": self.name, "shape": self.shape, "train": len(self.train), "test": len(self.test),
                "fingerprint": self.fingerprint()}

    def describe(self):
        c, hh, w = self.shape
        labels = f", {self.num_classes} classes" if self.num_classes else ", no labels"
        return f"{self.name}: {len(self.train)} train / {len(self.test)} test images of {c}x{hh}x{w}{labels}"


def _split_indices(n, test, seed=SPLIT_SEED):
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[test:]), np.sort(perm[:test])


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - sklearn is in the demo extra
        raise DataError("the digits data set needs scikit-learn: pip install 'ipfm_fast[demo]'") from err
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.uint8))[:, None]  # [1797, 1, 8, 8], 0..16
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr, te = _split_indices(images.shape[0], DIGITS_TEST)
    scale = 2.0 / 16.0
    return Dataset("digits", Split(images[tr], labels[tr], scale), Split(images[te], labels[te], scale),
                   num_classes=10, info={"source": "sklearn.datasets.load_digits"})


def _member(data, key, path):
    """One array of an opened .npz. Members are read (decompressed, CRC-checked) only here,
    so a damaged member fails here: a DataError naming the file and the key."""
    try:
        return data[key]
    except Exception as err:  # noqa: BLE001 - zipfile/zlib/numpy raise many types for a damaged member
        raise DataError(f"{path}[{key}]: cannot read this array ({type(err).__name__}: {err}); the file is truncated "
                        f"or damaged") from err


def check_finite_array(arr, where, why=""):
    """A float array read from a file must hold no NaN/Inf: a DataError naming ``where``, how
    many values, the first sample (leading index) holding one, and ``why`` that matters."""
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.argwhere(bad)[0][0]) if arr.ndim else 0
        raise DataError(f"{where} holds {int(bad.sum())} NaN/Inf value(s) (the first in sample {first})"
                        + (f": {why}" if why else ""))


def _to_nchw(arr, where):
    if arr.dtype != np.uint8:
        nonfinite = np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all()
        raise DataError(f"{where}: images must be uint8 (0..255), got dtype {arr.dtype}"
                        + (" (which also holds NaN/Inf values)" if nonfinite else ""))
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3):
            return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
        if arr.shape[1] in (1, 3, 4):
            return arr
    raise DataError(f"{where}: expected images [N, H, W], [N, H, W, C] or [N, C, H, W] with C in 1, 3, 4; "
                    f"got shape {arr.shape}")


def _labels(arr, n, where):
    if arr is None:
        return None
    arr = np.asarray(arr).reshape(-1)
    if arr.shape[0] != n or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{where}: labels must be {n} integers, got shape {arr.shape} dtype {arr.dtype}")
    return torch.from_numpy(arr.astype(np.int64))


def _from_arrays(name, images, labels, test_fraction, info, split=None):
    scale = 2.0 / 255.0
    if split is not None:
        (xtr, ytr), (xte, yte) = split
        train = Split(torch.from_numpy(xtr), ytr, scale)
        test = Split(torch.from_numpy(xte), yte, scale)
    else:
        n = images.shape[0]
        if not 0 < test_fraction < 1:
            raise InvalidInput(f"test_fraction must be in (0, 1), got {test_fraction}")
        test = max(1, int(round(n * test_fraction)))
        if n - test < 1:
            raise DataError(f"{name}: {n} image(s) are too few to split into train and test")
        tr, te = _split_indices(n, test)
        x = torch.from_numpy(images)
        train = Split(x[tr], None if labels is None else labels[tr], scale)
        test = Split(x[te], None if labels is None else labels[te], scale)
    num_classes = 0
    if train.labels is not None:
        num_classes = int(max(train.labels.max(), test.labels.max() if test.labels is not None else 0)) + 1
    return Dataset(name, train, test, num_classes=num_classes, info=info)


def _npz(path, test_fraction):
    try:
        data = np.load(path, allow_pickle=False)
        keys = list(data.keys())
    except Exception as err:  # noqa: BLE001 - any failure is an unreadable file
        raise DataError(f"{path}: cannot read as .npz ({type(err).__name__}: {err})") from err
    info = {"source": os.path.abspath(path), "keys": keys}
    name = os.path.basename(path)
    if "x_train" in keys and "x_test" in keys:
        xtr = _to_nchw(_member(data, "x_train", path), f"{path}[x_train]")
        xte = _to_nchw(_member(data, "x_test", path), f"{path}[x_test]")
        if xtr.shape[1:] != xte.shape[1:]:
            raise DataError(f"{path}: x_train images are {xtr.shape[1:]} but x_test images are {xte.shape[1:]}")
        ytr = _labels(_member(data, "y_train", path), xtr.shape[0], f"{path}[y_train]") if "y_train" in keys else None
        yte = _labels(_member(data, "y_test", path), xte.shape[0], f"{path}[y_test]") if "y_test" in keys else None
        if (ytr is None) != (yte is None):
            ytr = yte = None
        return _from_arrays(name, None, None, test_fraction, info, split=((xtr, ytr), (xte, yte)))
    for key in ("x", "images", "arr_0"):
        if key in keys:
            images = _to_nchw(_member(data, key, path), f"{path}[{key}]")
            break
    else:
        raise DataError(f"{path}: no image array found; expected x_train + x_test, or one of x, images, arr_0 "
                        f"(found keys {keys})")
    label_key = next((k for k in ("y", "labels") if k in keys), None)
    labels = _labels(_member(data, label_key, path), images.shape[0], f"{path}[{label_key}]") if label_key else None
    return _from_arrays(name, images, labels, test_fraction, info)


def _folder(path, test_fraction, skip_bad_images=False, log=None):
    from PIL import Image

    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files += [os.path.join(root, f) for f in sorted(names) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise DataError(f"{path}: no PNG/JPEG images found (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
    arrays, first, kept = [], None, []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as err:  # noqa: BLE001 - PIL raises many types
            if not skip_bad_images:
                raise DataError(f"{f}: cannot read image ({type(err).__name__}: {err}); --skip-bad-images leaves "
                                f"unreadable files out") from err
            (log or print)(f"warning: skipping unreadable image {f} ({type(err).__name__}: {err})")
            continue
        kept.append(f)
        if first is None:
            first = (f, arr.shape[:2])
        elif arr.shape[:2] != first[1]:
            raise DataError(f"images have mixed sizes: {first[0]} is {first[1][1]}x{first[1][0]} but {f} is "
                            f"{arr.shape[1]}x{arr.shape[0]} (width x height); resize them to one size first")
        arrays.append(arr)
    files = kept
    if not files:
        raise DataError(f"{path}: none of its images could be read")
    images = np.stack(arrays).transpose(0, 3, 1, 2)  # [N, 3, H, W]
    if (images == images[:, :1]).all():  # all grey: keep one channel
        images = images[:, :1]
    images = np.ascontiguousarray(images)
    classes = sorted({os.path.relpath(os.path.dirname(f), path) for f in files})
    labels = None
    if len(classes) > 1 and "." not in classes:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[os.path.relpath(os.path.dirname(f), path)] for f in files])
    info = {"source": os.path.abspath(path), "files": len(files), "classes": classes if labels is not None else []}
    return _from_arrays(os.path.basename(os.path.normpath(path)), images, labels, test_fraction, info)


def load_dataset(spec="digits", *, test_fraction=0.1, skip_bad_images=False, log=None):
    """Load a :class:`Dataset` from ``"digits"``, a folder of PNG/JPEG images or an .npz
    file. Raises :class:`~ipfm_fast.errors.MissingFile` for a missing path and
    :class:`DataError` (a ValueError) for unreadable files, mixed image sizes or a bad
    layout; ``skip_bad_images`` leaves unreadable files of a folder out instead, naming
    each through ``log``."""
    if spec == "digits":
        return _digits()
    spec = os.fspath(spec)
    if not os.path.exists(spec):
        raise MissingFile(f"data: {spec!r} does not exist (expected 'digits', a folder of PNG/JPEG "
                          f"images or an .npz file of uint8 images)")
    if os.path.isdir(spec):
        return _folder(spec, test_fraction, skip_bad_images, log)
    if spec.lower().endswith(".npz"):
        return _npz(spec, test_fraction)
    raise DataError(f"data: {spec!r} is a file but not an .npz (expected 'digits', a folder of PNG/JPEG "
                    f"images or an .npz file of uint8 images)")


def load_images(path):
    """All images of an .npz (key ``x``, ``images`` or ``arr_0``; uint8, layouts as in
    :func:`load_dataset`) or of a folder, as float32 [N, C, H, W] in [-1, 1], unsplit.

    ``x_float``, the full-precision copy ``sample --npz`` writes next to ``x``, is checked
    after loading: NaN/Inf there means the model produced non-finite samples, whose uint8
    ``x`` is arbitrary, so the file is refused (DataError) instead of scored."""
    ds = load_dataset(path, test_fraction=0.5) if os.path.isdir(os.fspath(path)) else None
    if ds is not None:
        return torch.cat([ds.train.floats(), ds.test.floats()])
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFile(f"samples: {path!r} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        keys = list(data.keys())
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: cannot read as .npz ({type(err).__name__}: {err})") from err
    key = next((k for k in ("x", "images", "arr_0") if k in keys), None)
    if key is None:
        raise DataError(f"{path}: no array x, images or arr_0 (found {keys})")
    arr = _member(data, key, path)
    if "x_float" in keys:
        check_finite_array(_member(data, "x_float", path), f"{path}[x_float]",
                           "the model that made these samples produced non-finite values, so their uint8 x is "
                           "arbitrary; nothing to score")
    return torch.from_numpy(_to_nchw(arr, f"{path}[{key}]")).float() * (2.0 / 255.0) - 1.0


def to_uint8(x):
    """Images in [-1, 1] (any float tensor [B, C, H, W]) -> uint8 numpy [B, H, W, C]."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(x, path, *, nrow=None, pad=1, upscale=None):
    """Write a PNG grid of images in [-1, 1] ([B, C, H, W]); small images are upscaled
    (nearest) so the grid is at least ~256 pixels wide."""
    from PIL import Image

    imgs = to_uint8(x)
    b, h, w, c = imgs.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(b))))
    ncol = int(np.ceil(b / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = imgs[i]
    if upscale is None:
        upscale = max(1, -(-256 // grid.shape[1]))
    img = Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3])
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    with replacing(path, ".png") as tmp:
        img.save(tmp)
    return path
