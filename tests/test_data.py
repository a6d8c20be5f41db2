"""binslt.data: the fixed digits split, npz / imagefolder loading, and the missing-data errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fake_cifar

from binslt.training import data


def test_digits_split_is_fixed_stratified_and_normalised():
    a, b = data.load("digits"), data.load("digits")
    xa, ya = a.train.tensors
    xt, yt = a.test.tensors
    assert (a.num_classes, a.in_channels, a.input_size) == (10, 1, 8)
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert tuple(xa.shape[1:]) == (1, 8, 8) and xa.dtype == torch.float32
    assert ya.dtype == torch.int64
    # the same split every time
    assert torch.equal(xa, b.train.tensors[0]) and torch.equal(yt, b.test.tensors[1])
    # stratified: every class holds 20 % (+-1 example) of its examples in the test split
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(yt.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * full) <= 1)
    # normalised with the training split's statistics
    assert abs(xa.mean().item()) < 1e-5 and abs(xa.std().item() - 1) < 1e-4
    assert abs(xt.mean().item()) < 0.1
    # no image is in both splits
    tr = {tuple(r) for r in xa.flatten(1).numpy().round(5).tolist()}
    assert not any(tuple(r) in tr for r in xt.flatten(1).numpy().round(5).tolist())


def test_digits_pixels_were_scaled_to_unit_range_before_normalising():
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    tr, _ = data.split_indices(load_digits().target)
    mean, std = raw[tr].mean(), raw[tr].std()
    b = data.load("digits")
    torch.testing.assert_close(b.train.tensors[0].squeeze(1), (raw[tr] - mean) / std)


@pytest.mark.parametrize("channels_last", [False, True])
def test_npz_with_split_arrays(tmp_path, channels_last):
    rng = np.random.default_rng(0)
    shape = (40, 6, 6, 3) if channels_last else (40, 6, 6)
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    y = np.arange(40) % 4
    xt = rng.integers(0, 256, size=(12, *shape[1:]), dtype=np.uint8)
    yt = np.arange(12) % 4
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y, x_test=xt, y_test=yt)
    b = data.load(f"npz:{p}")
    c = 3 if channels_last else 1
    assert (b.num_classes, b.in_channels, b.input_size) == (4, c, 6)
    assert (len(b.train), len(b.test)) == (40, 12)
    xtr = b.train.tensors[0]
    assert tuple(xtr.shape) == (40, c, 6, 6)
    # uint8 -> [0, 1] -> per-channel standardisation with the training statistics
    ref = torch.from_numpy(x.astype(np.float32) / 255.0)
    ref = ref.permute(0, 3, 1, 2) if channels_last else ref.unsqueeze(1)
    mean = ref.mean(dim=(0, 2, 3), keepdim=True)
    std = ref.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(xtr, (ref - mean) / std)
    assert torch.equal(b.test.tensors[1], torch.from_numpy(yt).long())


def test_npz_without_test_arrays_uses_the_documented_split(tmp_path):
    x = np.random.default_rng(1).random((50, 5, 5)).astype(np.float32)
    y = np.repeat(np.arange(5), 10)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    b = data.load(f"npz:{p}")
    tr, te = data.split_indices(y)
    assert (len(b.train), len(b.test)) == (40, 10) == (len(tr), len(te))
    assert torch.equal(b.test.tensors[1], torch.from_numpy(y[te]).long())
    assert sorted(b.test.tensors[1].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((4, 3, 3))}, "must contain arrays 'x' and 'y'"),
    ({"x": np.zeros((4, 3)), "y": np.zeros(4, int)}, r"\[N, H, W\]"),
    ({"x": np.zeros((4, 3, 3)), "y": np.zeros(5, int)}, "1-D array of 4 labels"),
    ({"x": np.zeros((4, 3, 3)), "y": np.zeros(4)}, "integer class ids"),
    ({"x": np.zeros((4, 3, 3)), "y": np.zeros(4, int), "x_test": np.zeros((2, 3, 3))},
     "only one of x_test"),
    ({"x": np.zeros((4, 3, 3)), "y": np.zeros(4, int), "x_test": np.zeros((2, 4, 4)),
      "y_test": np.zeros(2, int)}, "differ"),
    ({"x": np.zeros((4, 3, 5)), "y": np.zeros(4, int)}, "square"),
])
def test_npz_malformed(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(data.DatasetError, match=match):
        data.load(f"npz:{p}")


def _npy(path):
    np.save(path, np.zeros((4, 3, 3)))


def _object_member(path):
    np.savez(path, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, int))


@pytest.mark.parametrize("write, match", [
    (lambda p: p.write_bytes(b"x"), r"is not a zip archive \(it starts with b'x'\), not an .npz"),
    (lambda p: p.write_bytes(b""), "is empty, not an .npz file"),
    (lambda p: p.write_bytes(b"\x80\x04\x95 a pickle"), "is not a zip archive"),
    (lambda p: (_npy(p.with_suffix(".npy")), p.write_bytes(p.with_suffix(".npy").read_bytes())),
     "is a single .npy array, not an .npz file; write one with numpy.savez"),
    (_object_member, r"an array holds Python objects \(pickled data\)"),
])
def test_npz_that_is_not_a_numeric_archive_is_refused_without_unpickling_advice(tmp_path, write,
                                                                               match):
    # numpy reads any non-zip file as a pickle and suggests allow_pickle=True: binslt names what
    # the file is instead, and never unpickles.
    p = tmp_path / "bad.npz"
    write(p)
    with pytest.raises(data.DatasetError, match=match) as info:
        data.load(f"npz:{p}")
    assert "allow_pickle" not in str(info.value) and "bad.npz" in str(info.value)


def _nchw_images(n, c, size, seed):
    return np.random.default_rng(seed).random((n, c, size, size)).astype(np.float32)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NHW"])
def test_npz_layouts_put_each_value_in_the_same_place(tmp_path, layout):
    c = 1 if layout == "NHW" else 3
    x, xt = _nchw_images(30, c, 5, 0), _nchw_images(10, c, 5, 1)
    to_file = {"NCHW": lambda a: a, "NHWC": lambda a: a.transpose(0, 2, 3, 1),
               "NHW": lambda a: a[:, 0]}[layout]
    p = tmp_path / f"{layout}.npz"
    np.savez(p, x=to_file(x), y=np.arange(30) % 3, x_test=to_file(xt), y_test=np.arange(10) % 3)
    b = data.load(f"npz:{p}")
    assert (b.in_channels, b.input_size) == (c, 5)
    want_tr, want_te = data._normalise(torch.from_numpy(x), torch.from_numpy(xt))
    assert torch.equal(b.train.tensors[0], want_tr)
    assert torch.equal(b.test.tensors[0], want_te)


def test_npz_layout_rule_for_ambiguous_shapes(tmp_path):
    """Dim 1 of 1 or 3 with equal last two dims is channels-first; any other 4-D is channels-last."""
    for shape, chans, size in [((8, 3, 4, 4), 3, 4), ((8, 1, 6, 6), 1, 6), ((8, 4, 4, 3), 3, 4),
                               ((8, 3, 3, 3), 3, 3), ((8, 5, 5, 5), 5, 5)]:
        p = tmp_path / "a.npz"
        np.savez(p, x=np.random.default_rng(0).random(shape), y=np.arange(8) % 2)
        b = data.load(f"npz:{p}")
        assert (b.in_channels, b.input_size) == (chans, size), shape


@pytest.mark.parametrize("shape, match", [
    ((6, 2, 3, 4, 4), r"must have shape \[N, H, W\], \[N, H, W, C\] or \[N, C, H, W\]"),
    ((6,), r"must have shape \[N, H, W\], \[N, H, W, C\] or \[N, C, H, W\]"),
    ((6, 4, 6, 6), r"x images must be square, got 4x6 .*channels-first when dim 1 is 1 or 3"),
    ((6, 1, 8), r"x images must be square, got 1x8"),
])
def test_npz_unsupported_shape_names_the_file_and_the_layouts(tmp_path, shape, match):
    p = tmp_path / "shape.npz"
    np.savez(p, x=np.zeros(shape, np.float32), y=np.zeros(6, int))
    with pytest.raises(data.DatasetError, match=match) as exc:
        data.load(f"npz:{p}")
    assert str(exc.value).startswith(f"{p}: ")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("array", ["x", "x_test"])
def test_npz_nan_or_inf_pixels_are_refused_at_load_time(tmp_path, bad, array):
    arrays = {"x": _nchw_images(10, 1, 4, 0), "y": np.arange(10) % 2,
              "x_test": _nchw_images(4, 1, 4, 1), "y_test": np.arange(4) % 2}
    arrays[array].reshape(-1)[[0, 5, 7]] = bad
    p = tmp_path / "nan.npz"
    np.savez(p, **arrays)
    with pytest.raises(data.DatasetError) as exc:
        data.load(f"npz:{p}")
    assert str(exc.value) == f"{p}: 3 NaN/inf pixel values in {array}"


def test_npz_float64_pixels_beyond_float32_are_refused(tmp_path):
    x = np.zeros((6, 3, 3))
    x[0, 0, 0] = 1e300
    p = tmp_path / "big.npz"
    np.savez(p, x=x, y=np.arange(6) % 2)
    with pytest.raises(data.DatasetError, match="1 pixel values in x overflow float32"):
        data.load(f"npz:{p}")


def test_search_on_a_nan_file_exits_2_with_one_line_naming_the_file(tmp_path):
    import os
    import subprocess
    import sys

    x = _nchw_images(20, 1, 8, 0)
    x[3, 0, 2, 2] = np.nan
    p = tmp_path / "nan.npz"
    np.savez(p, x=x, y=np.arange(20) % 2)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "binslt", "search", "--dataset", f"npz:{p}",
                        "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"binslt search: error: {p}: 1 NaN/inf pixel values in x\n", r.stderr


def test_missing_and_unknown_datasets_say_how_to_provide_them(tmp_path):
    with pytest.raises(data.DatasetNotFound, match="npz:PATH"):
        data.load(f"npz:{tmp_path / 'nope.npz'}")
    with pytest.raises(data.DatasetNotFound, match="--download"):
        data.load("cifar10", data_dir=str(tmp_path), download=False)
    with pytest.raises(data.DatasetNotFound, match="cifar-100-python"):
        data.load("cifar100", data_dir=str(tmp_path), download=False)
    with pytest.raises(data.DatasetNotFound, match="one sub-directory of images per class"):
        data.load(f"imagefolder:{tmp_path / 'none'}")
    with pytest.raises(data.DatasetError, match="unknown dataset 'mnist'"):
        data.load("mnist")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(data.DatasetError, match="junk.npz' is not a zip archive"):
        data.load(f"npz:{tmp_path / 'junk.npz'}")
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 a torn zip")
    with pytest.raises(data.DatasetError, match="could not read .*torn.npz' as .npz"):
        data.load(f"npz:{tmp_path / 'torn.npz'}")


def test_imagefolder_without_images_names_a_few_of_its_folders(tmp_path):
    """A directory of many subfolders and no images (a wrong path): torchvision names every
    folder; the error keeps eight and the count."""
    for i in range(40):
        (tmp_path / "wrong" / f"dir{i:02d}").mkdir(parents=True)
    with pytest.raises(data.DatasetError) as exc:
        data.load(f"imagefolder:{tmp_path / 'wrong'}")
    msg = str(exc.value)
    assert "no image file in the class folders dir00, dir01" in msg
    assert "dir07, ... (40 in all). Supported extensions are: .jpg" in msg
    assert "dir08" not in msg and len(msg) < 400


def _png_tree(root, classes=("a", "b"), per_class=5, size=(10, 12)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_imagefolder_single_folder_split_and_train_val_layout(tmp_path):
    _png_tree(tmp_path / "one")
    b = data.load(f"imagefolder:{tmp_path / 'one'}", image_size=8)
    assert (b.num_classes, b.in_channels, b.input_size) == (2, 3, 8)
    assert (len(b.train), len(b.test)) == (8, 2)
    x, y = b.test[0]
    assert tuple(x.shape) == (3, 8, 8) and x.dtype == torch.float32 and y in (0, 1)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # mean = std = 0.5

    _png_tree(tmp_path / "two" / "train", per_class=3)
    _png_tree(tmp_path / "two" / "val", per_class=2)
    b2 = data.load(f"imagefolder:{tmp_path / 'two'}", image_size=6)
    assert (len(b2.train), len(b2.test), b2.num_classes) == (6, 4, 2)
    assert tuple(b2.train[0][0].shape) == (3, 6, 6)


def test_imagefolder_refuses_unreadable_and_nan_images_at_load_time(tmp_path):
    from PIL import Image

    _png_tree(tmp_path / "broken")
    bad = tmp_path / "broken" / "a" / "3.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(data.DatasetError, match="not a readable image") as exc:
        data.load(f"imagefolder:{tmp_path / 'broken'}", image_size=8)
    assert str(exc.value).startswith(f"{bad}: ")

    _png_tree(tmp_path / "nan")
    pixels = np.full((6, 6), 0.5, np.float32)
    pixels[1, 2], pixels[4, 4] = np.nan, np.inf
    tiff = tmp_path / "nan" / "b" / "float.tiff"
    Image.fromarray(pixels).save(tiff)
    assert Image.open(tiff).mode == "F"
    with pytest.raises(data.DatasetError) as exc:
        data.load(f"imagefolder:{tmp_path / 'nan'}", image_size=8)
    assert str(exc.value) == f"{tiff}: 2 NaN/inf pixel values"


def test_subset_takes_the_first_examples():
    b = data.load("digits").subset(100, 20)
    assert (len(b.train), len(b.test)) == (100, 20)
    full = data.load("digits")
    assert torch.equal(b.test[5][0], full.test[5][0])


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_on_fake_extracted_files(tmp_path, monkeypatch, name):
    """The CIFAR path end to end on files in torchvision's layout (md5 checks patched out: the
    real archives cannot be fetched here): sizes, labels, normalisation and the training
    augmentation (pad-4 crop: padded borders show up as the normalised value of 0)."""
    import torchvision.datasets.cifar as tvc

    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tvc.CIFAR10, "_check_integrity", lambda self: True)
    fake_cifar(tmp_path, name, 10, 4, 128)
    b = data.load(name, data_dir=str(tmp_path), download=False)
    assert (b.num_classes, b.in_channels, b.input_size) == ((10 if name == "cifar10" else 100),
                                                           3, 32)
    assert len(b.train) == 10 and len(b.test) == 4
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in data.CIFAR_STATS[name])
    x, y = b.test[1]
    assert x.shape == (3, 32, 32) and y == 1
    torch.testing.assert_close(x, ((128 / 255 - mean) / std).expand(3, 32, 32))
    zero = (0 - mean) / std  # what a padded pixel becomes
    torch.manual_seed(0)
    shifted = 0
    for i in range(10):
        xt, _ = b.train[i]
        assert xt.shape == (3, 32, 32)
        border = torch.isclose(xt, zero.expand(3, 32, 32)).all(0)
        shifted += bool(border.any())
    assert shifted > 0  # some crops reach into the padding


class _Planted:
    """Unpickling this runs a function: what a planted CIFAR batch would do."""

    def __reduce__(self):
        import os

        return (os.mkdir, (self.target,))


def test_cifar_batch_that_would_run_code_is_refused(tmp_path, monkeypatch):
    """A batch file whose pickle calls a function (here os.mkdir) is refused with one message
    naming the file, and the function never runs."""
    import pickle

    import torchvision.datasets.cifar as tvc

    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    fake_cifar(tmp_path, "cifar10", 10, 4, 128)
    planted = _Planted()
    planted.target = str(tmp_path / "pwned")
    bad = tmp_path / tvc.CIFAR10.base_folder / tvc.CIFAR10.train_list[2][0]
    bad.write_bytes(pickle.dumps({"data": planted, "labels": [0]}))
    with pytest.raises(data.DatasetError, match=r"data_batch_3: not a CIFAR python batch.*"
                       r"posix\.mkdir|data_batch_3: not a CIFAR python batch.*os\.mkdir"):
        data.load("cifar10", data_dir=str(tmp_path), download=False)
    assert not (tmp_path / "pwned").exists()
    bad.write_bytes(b"\x80\x04truncated")
    with pytest.raises(data.DatasetError, match="data_batch_3: not a CIFAR python batch"):
        data.load("cifar10", data_dir=str(tmp_path), download=False)


def test_evaluation_split_limits_and_refuses_empty_or_unknown_splits():
    b = data.load("digits")
    assert len(data.evaluation_split(b, "test")) == 360
    ds = data.evaluation_split(b, "train", 7)
    assert len(ds) == 7 and torch.equal(ds[3][0], b.train[3][0])
    with pytest.raises(data.DatasetError, match="split must be 'test' or 'train', got 'val'"):
        data.evaluation_split(b, "val")
    empty = data.DataBundle("e", b.train, torch.utils.data.Subset(b.test, []), 10, 1, 8, "")
    with pytest.raises(data.DatasetError, match="dataset 'e' has no test examples"):
        data.evaluation_split(empty, "test")
