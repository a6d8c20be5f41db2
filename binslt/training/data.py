"""Datasets for the search / baseline CLI.

``load(spec, ...)`` turns a dataset name into a :class:`DataBundle` (train and test
``torch.utils.data.Dataset`` objects plus the input shape and class count). Every dataset yields
``(image [C, H, W] float32, label int64)`` pairs, already normalised.

Specs and their fixed conventions:

``digits``
    scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, 1 channel); offline.
    Split: stratified 80/20 with ``random_state=0`` (1437 train / 360 test). Pixels (0..16) are
    divided by 16 to lie in [0, 1], then normalised with the *training* split's mean and std.
``cifar10`` / ``cifar100``
    CIFAR under ``data_dir`` in torchvision's extracted python layout (``download=True``
    fetches it), its batch pickles read by an unpickler that builds only arrays and lists.
    Training images get random crop (32, padding 4) and horizontal flip; both splits are
    normalised with the usual per-channel CIFAR mean/std.
``imagefolder:PATH``
    torchvision ``ImageFolder``. If ``PATH`` has ``train/`` and ``val/`` (or ``test/``)
    subfolders those are the splits; otherwise the single folder is split stratified 80/20 with
    seed 0. Images are converted to RGB, resized and centre-cropped to ``image_size``; training
    images also get random crop (padding image_size/8) and flip; normalised with mean=std=0.5.
    Files that do not open as images, and float (mode ``F``) images with NaN/inf pixels, are
    refused at load time.
``npz:PATH``
    A NumPy ``.npz`` with ``x`` and ``y`` ([N] integer labels), and optionally ``x_test`` /
    ``y_test``; without them the split is stratified 80/20 with seed 0 (plain 80/20 if a class is
    too small to stratify). Images are [N, H, W] (one channel), [N, H, W, C] or [N, C, H, W]. A 4-D
    array is read as channels-first [N, C, H, W] when dim 1 is 1 or 3 and the last two dims are
    equal (``[N, 3, 32, 32]``, ``[N, 1, 8, 8]``), and as channels-last [N, H, W, C] otherwise
    (``[N, 32, 32, 3]``); images must be square. Integer images are divided by their dtype's
    maximum (255 for uint8); float images are used as they are and must be finite. Both splits are
    normalised per channel with the training split's mean and std. Classes are ``0 .. max(y)``.

A dataset that is not there raises :class:`DatasetNotFound` with a message that says how to
provide it; a file that is there but unusable (bad shape, NaN/inf pixels, unreadable image)
raises :class:`DatasetError` at load time, with a message that names the file and the problem.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .runtime import gc_paused

SPLIT_SEED = 0
TEST_FRACTION = 0.2

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

DATASETS_HELP = ("digits (scikit-learn, offline), cifar10, cifar100 (torchvision; --data-dir, "
                 "--download), imagefolder:PATH, npz:PATH")


class DatasetError(Exception):
    """A dataset is unusable (malformed, unreadable); the message says what is wrong."""


class DatasetNotFound(DatasetError):
    """The dataset is missing; the message says how to provide it."""


@dataclass
class DataBundle:
    """Train/test datasets and what a model needs to know about them."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    input_size: int
    description: str

    def subset(self, train: int | None = None, test: int | None = None) -> DataBundle:
        """The first ``train`` / ``test`` examples (for quick runs and tests)."""
        tr = self.train if not train else Subset(self.train, range(min(train, len(self.train))))
        te = self.test if not test else Subset(self.test, range(min(test, len(self.test))))
        return DataBundle(self.name, tr, te, self.num_classes, self.in_channels, self.input_size,
                          self.description + f" (subset {len(tr)}/{len(te)})")


def split_indices(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) index arrays; plain random split if a class is too small."""
    with gc_paused():
        from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    try:
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                  stratify=labels)
    except ValueError:
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed)
    return np.sort(tr), np.sort(te)


def _normalise(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel standardisation of [N, C, H, W] tensors with the training split's stats."""
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits() -> DataBundle:
    """scikit-learn digits, 8x8x1, 10 classes, stratified 80/20 split with seed 0."""
    with gc_paused():
        from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = split_indices(d.target)
    xtr, xte = _normalise(x[tr], x[te])
    return DataBundle("digits", TensorDataset(xtr, y[tr]), TensorDataset(xte, y[te]), 10, 1, 8,
                      f"scikit-learn digits 8x8x1, {len(tr)} train / {len(te)} test "
                      "(stratified 80/20, seed 0)")


NPZ_LAYOUTS = ("[N, H, W], [N, H, W, C] or [N, C, H, W] (channels-first when dim 1 is 1 or 3 and "
               "the last two dims are equal)")


def _channels_first(shape: tuple[int, ...]) -> bool:
    """The layout rule of a 4-D npz image array (module docstring)."""
    return shape[1] in (1, 3) and shape[2] == shape[3]


def _to_nchw(x: np.ndarray, what: str, where: str) -> torch.Tensor:
    """npz images -> [N, C, H, W] float32; ``where`` names the file in error messages."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and not _channels_first(x.shape):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DatasetError(f"{where}: {what} must have shape {NPZ_LAYOUTS}, got {x.shape}")
    if x.shape[2] != x.shape[3]:
        raise DatasetError(f"{where}: {what} images must be square, got {x.shape[2]}x{x.shape[3]} "
                           f"from shape [N, C, H, W] = {x.shape}; {what} is read as {NPZ_LAYOUTS}")
    if np.issubdtype(x.dtype, np.integer):
        x32 = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
    elif np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DatasetError(f"{where}: {bad} NaN/inf pixel values in {what}")
        with np.errstate(over="ignore"):  # counted and reported just below
            x32 = x.astype(np.float32)
        bad = int(np.count_nonzero(~np.isfinite(x32)))
        if bad:
            raise DatasetError(f"{where}: {bad} pixel values in {what} overflow float32")
    else:
        raise DatasetError(f"{where}: {what} must hold numbers, got dtype {x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x32))


def _labels(y: np.ndarray, n: int, what: str, where: str) -> torch.Tensor:
    if y.ndim != 1 or len(y) != n:
        raise DatasetError(f"{where}: {what} must be a 1-D array of {n} labels, got shape "
                           f"{y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DatasetError(f"{where}: {what} must hold non-negative integer class ids, got "
                           f"{y.dtype}")
    return torch.from_numpy(y.astype(np.int64))


def _check_npz_magic(p: Path) -> None:
    """Refuse a file that is not a zip archive before numpy reads it: numpy takes any other file
    for a pickle and answers with advice to unpickle it, which binslt never does."""
    try:
        with open(p, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise DatasetError(f"could not read {str(p)!r}: {exc.strerror or exc}") from None
    if head.startswith(b"PK"):
        return
    what = ("a single .npy array" if head == b"\x93NUMPY" else
            "empty" if not head else f"not a zip archive (it starts with {head!r})")
    raise DatasetError(f"{str(p)!r} is {what}, not an .npz file; write one with "
                       "numpy.savez(path, x=..., y=...)")


def load_npz(path: str) -> DataBundle:
    """``npz:PATH`` (see the module docstring for the array names and the split)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetNotFound(f"npz file {str(p)!r} not found; give npz:PATH to a .npz with arrays "
                              f"x {NPZ_LAYOUTS} and y [N] (optionally x_test, y_test)")
    _check_npz_magic(p)
    try:
        arrays = np.load(p, allow_pickle=False)
        keys = set(arrays.files)
    except Exception as exc:
        raise DatasetError(f"could not read {str(p)!r} as .npz: {exc}") from None
    where = str(p)
    if not {"x", "y"} <= keys:
        raise DatasetError(f"{where}: must contain arrays 'x' and 'y' (has {sorted(keys)})")
    try:
        x = _to_nchw(arrays["x"], "x", where)
        y = _labels(arrays["y"], x.shape[0], "y", where)
        if "x_test" in keys or "y_test" in keys:
            if not {"x_test", "y_test"} <= keys:
                raise DatasetError(f"{where}: has only one of x_test / y_test; give both or "
                                   "neither")
            xtr, ytr = x, y
            xte = _to_nchw(arrays["x_test"], "x_test", where)
            yte = _labels(arrays["y_test"], xte.shape[0], "y_test", where)
            if xte.shape[1:] != xtr.shape[1:]:
                raise DatasetError(f"{where}: x_test images {tuple(xte.shape[1:])} (C, H, W) "
                                   f"differ from x images {tuple(xtr.shape[1:])}")
            split = "given x_test/y_test"
        else:
            tr, te = split_indices(y.numpy())
            xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
            split = "stratified 80/20, seed 0"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # a corrupt member
        if "allow_pickle" in str(exc):  # an object array: numpy's message suggests unpickling it
            raise DatasetError(f"{where}: an array holds Python objects (pickled data), which "
                               "binslt does not load; save numeric arrays") from None
        raise DatasetError(f"could not read {where!r} as .npz: {exc}") from None
    xtr, xte = _normalise(xtr, xte)
    ncls = int(max(int(ytr.max()), int(yte.max()) if len(yte) else 0)) + 1
    return DataBundle(f"npz:{p}", TensorDataset(xtr, ytr), TensorDataset(xte, yte), ncls,
                      xtr.shape[1], xtr.shape[2],
                      f"{p.name}: {len(xtr)} train / {len(xte)} test, {ncls} classes ({split})")


def _vision():
    try:
        import torchvision
        from torchvision import transforms
    except ImportError as exc:
        raise DatasetNotFound(f"this dataset needs torchvision ({exc}); "
                              "`pip install torchvision` or `pip install binslt[vision]`") from None
    return torchvision, transforms


class _ArraysUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles. This unpickler builds only what they hold (dicts,
    lists, strings, numbers and numpy arrays): any other class or function in the file is refused,
    so a planted file cannot run code."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never "
                                     "does (refused: loading it could run code)")


def _read_cifar_batch(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32, 3], labels int64 [N]) of one extracted CIFAR batch file."""
    try:
        with open(path, "rb") as f:
            entry = _ArraysUnpickler(f, encoding="latin1").load()
        x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(entry[label_key], dtype=np.int64).reshape(-1)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError,
            AttributeError, IndexError) as exc:
        raise DatasetError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: {exc})") \
            from None
    if len(x) != len(y):
        raise DatasetError(f"{path}: {len(x)} images but {len(y)} labels")
    return x.transpose(0, 2, 3, 1), y


class _CifarSplit(Dataset):
    """Images as PIL images through ``transform`` (torchvision's CIFAR datasets do the same)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def load_cifar(name: str, data_dir: str, download: bool) -> DataBundle:
    """CIFAR-10/100 in torchvision's extracted python layout, read with :class:`_ArraysUnpickler`
    (torchvision's own datasets call ``pickle.load``, which would run whatever a planted file
    holds); torchvision fetches and checks the archive. Crop-pad-4 + flip augmentation."""
    torchvision, T = _vision()
    import torchvision.datasets.cifar as tvc
    from torchvision.datasets.utils import download_and_extract_archive

    mean, std = CIFAR_STATS[name]
    norm = T.Normalize(mean, std)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          norm])
    test_tf = T.Compose([T.ToTensor(), norm])
    cls = tvc.CIFAR10 if name == "cifar10" else tvc.CIFAR100
    root = os.path.expanduser(data_dir)
    folder = os.path.join(root, cls.base_folder)

    def intact() -> bool:
        return all(tvc.check_integrity(os.path.join(folder, f), md5)
                   for f, md5 in cls.train_list + cls.test_list)

    if download and not intact():
        try:
            download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
        except OSError as exc:
            raise DatasetNotFound(f"could not fetch {name} into {root!r}: {exc}. Download it "
                                  "elsewhere and pass --data-dir") from None
    if not intact():
        raise DatasetNotFound(
            f"{name} not found (or corrupted) under {root!r}. Pass --download to fetch it (needs "
            f"network), or --data-dir DIR where DIR/{cls.base_folder} holds the extracted python "
            "version")
    label_key = "labels" if name == "cifar10" else "fine_labels"
    splits = []
    for files, tf in ((cls.train_list, train_tf), (cls.test_list, test_tf)):
        parts = [_read_cifar_batch(os.path.join(folder, f), label_key) for f, _ in files]
        splits.append(_CifarSplit(np.concatenate([p[0] for p in parts]),
                                  np.concatenate([p[1] for p in parts]), tf))
    train, test = splits
    ncls = 10 if name == "cifar10" else 100
    return DataBundle(name, train, test, ncls, 3, 32,
                      f"{name} 32x32x3 from {root}, {len(train)} train / {len(test)} test")


def _rgb(image):
    return image.convert("RGB")


def _check_image_files(paths: list[str]) -> None:
    """Refuse, at load time, image files that do not open and float images (PIL mode ``F``) with
    NaN/inf pixels, which the RGB conversion would silently turn into 0 or 255. Only headers are
    read, except for float images."""
    from PIL import Image

    bad = []
    for path in paths:
        try:
            with Image.open(path) as im:
                if im.mode == "F":
                    n = int(np.count_nonzero(~np.isfinite(np.asarray(im))))
                    if n:
                        bad.append(f"{path}: {n} NaN/inf pixel values")
        except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
            bad.append(f"{path}: not a readable image ({exc})")
    if bad:
        more = f" (and {len(bad) - 1} more bad image files)" if len(bad) > 1 else ""
        raise DatasetError(bad[0] + more)


def _folder_error(msg: str, limit: int = 8) -> str:
    """torchvision's ImageFolder error with its list of class folders cut to ``limit`` names (it
    names every subfolder, thousands in a wrong directory)."""
    m = re.fullmatch(r"Found no valid file for the classes (.*)\. (Supported extensions are: .*)",
                     msg, flags=re.S)
    if m is None:
        return msg
    classes = m.group(1).split(", ")
    shown = ", ".join(classes[:limit]) + (f", ... ({len(classes)} in all)"
                                          if len(classes) > limit else "")
    return f"no image file in the class folders {shown}. {m.group(2)}"


def load_imagefolder(path: str, image_size: int) -> DataBundle:
    """``imagefolder:PATH`` with train/ and val/ (or test/) subfolders, or one folder split
    80/20."""
    torchvision, T = _vision()
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFound(f"image folder {str(root)!r} not found; imagefolder:PATH needs a "
                              "directory with one sub-directory of images per class (or train/ "
                              "and val/ sub-directories laid out that way)")
    norm = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    base = [T.Lambda(_rgb), T.Resize(image_size),
            T.CenterCrop(image_size)]
    train_tf = T.Compose(base + [T.RandomCrop(image_size, padding=max(1, image_size // 8)),
                                 T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose(base + [T.ToTensor(), norm])
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    try:
        if (root / "train").is_dir() and test_dir is not None:
            train = torchvision.datasets.ImageFolder(str(root / "train"), transform=train_tf)
            test = torchvision.datasets.ImageFolder(str(test_dir), transform=test_tf)
            if train.classes != test.classes:
                raise DatasetError(f"{root}/train and {test_dir} have different classes")
            ncls, split = len(train.classes), f"train/ and {test_dir.name}/"
        else:
            full_tr = torchvision.datasets.ImageFolder(str(root), transform=train_tf)
            full_te = torchvision.datasets.ImageFolder(str(root), transform=test_tf)
            tr, te = split_indices(np.asarray(full_tr.targets))
            train, test = Subset(full_tr, tr.tolist()), Subset(full_te, te.tolist())
            ncls, split = len(full_tr.classes), "stratified 80/20, seed 0"
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"could not read image folder {str(root)!r}: "
                           f"{_folder_error(str(exc))}") from None
    folders = [train, test] if isinstance(train, torchvision.datasets.ImageFolder) else [full_tr]
    _check_image_files([path for folder in folders for path, _label in folder.samples])
    return DataBundle(f"imagefolder:{root}", train, test, ncls, 3, image_size,
                      f"ImageFolder {root} ({split}), {len(train)} train / {len(test)} test, "
                      f"{ncls} classes, {image_size}x{image_size}")


def evaluation_split(bundle: DataBundle, split: str, limit: int = 0) -> Dataset:
    """``bundle``'s ``split`` ('test' or 'train'), its first ``limit`` examples when ``limit`` > 0;
    DatasetError when that leaves none."""
    if split not in ("test", "train"):
        raise DatasetError(f"split must be 'test' or 'train', got {split!r}")
    ds = bundle.test if split == "test" else bundle.train
    if limit:
        ds = Subset(ds, range(min(limit, len(ds))))
    if len(ds) == 0:
        raise DatasetError(f"dataset {bundle.name!r} has no {split} examples")
    return ds


def load(spec: str, data_dir: str = "data", download: bool = False,
         image_size: int = 32) -> DataBundle:
    """Load a dataset by spec (``digits``, ``cifar10``, ``cifar100``, ``imagefolder:PATH``,
    ``npz:PATH``). Raises :class:`DatasetNotFound` with instructions when it is not available."""
    if spec == "digits":
        return load_digits()
    if spec in ("cifar10", "cifar100"):
        return load_cifar(spec, data_dir, download)
    if spec.startswith("imagefolder:"):
        return load_imagefolder(spec.split(":", 1)[1], image_size)
    if spec.startswith("npz:"):
        return load_npz(spec.split(":", 1)[1])
    raise DatasetError(f"unknown dataset {spec!r}; choose one of: {DATASETS_HELP}")
