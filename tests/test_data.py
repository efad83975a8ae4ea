"""Tests of normmatters.experiments.data: every format is built tiny here and loaded by the real code."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import tarfile

import numpy as np
import pytest
import torch

from normmatters.experiments.data import (
    EpochSampler,
    get_dataloaders,
    get_dataset,
    get_dataset_info,
    list_datasets,
    set_loader_epoch,
)
from normmatters.experiments.data.cifar import CIFAR_SPECS
from normmatters.experiments.data.text import default_corpus
from normmatters.experiments.data.transforms import RandomCrop
from normmatters.experiments.errors import ConfigError, DataNotFoundError


# -- embedded -------------------------------------------------------------------------------------
def test_mnist1d_generated_cached_and_leaves_global_rng_alone(tmp_path):
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    ds = get_dataset("mnist1d", root=tmp_path, train=True, augment=False)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    files = list((tmp_path / "mnist1d").iterdir())
    assert [f.suffix for f in files] == [".npz"]  # one cache file, no temporary left behind
    test = get_dataset("mnist1d", root=tmp_path, train=False)
    assert len(ds) == 4000 and len(test) == 1000
    x, y = ds[0]
    assert x.shape == (1, 40) and x.dtype == torch.float32 and 0 <= int(y) < 10
    assert sorted(torch.unique(ds.y).tolist()) == list(range(10))
    # Loading again (from the cache) gives the same arrays as the generation did.
    again = get_dataset("mnist1d", root=tmp_path, train=True, augment=False)
    assert torch.equal(again.x, ds.x) and torch.equal(again.y, ds.y)
    # The dataset is standardized as a whole (mnist1d centres and scales it).
    allx = torch.cat([ds.x, test.x])
    assert abs(allx.mean().item()) < 1e-4 and abs(allx.std().item() - 1) < 1e-3


def test_mnist1d_damaged_cache_is_rebuilt(tmp_path):
    ds = get_dataset("mnist1d", root=tmp_path, train=False, num_samples=300)
    assert len(ds) == 60
    (cache,) = list((tmp_path / "mnist1d").iterdir())
    cache.write_bytes(cache.read_bytes()[:100])
    ds2 = get_dataset("mnist1d", root=tmp_path, train=False, num_samples=300)
    assert torch.equal(ds.x, ds2.x)


def test_digits_split_is_stratified_and_standardized():
    tr, te, info = get_dataloaders("digits", batch_size=64, augment=False)
    assert (info.train_size, info.test_size) == (1437, 360)
    assert info.input_shape == (1, 8, 8) and info.input_dims == 2 and info.in_channels == 1
    x = tr.dataset.x
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-2
    counts = torch.bincount(te.dataset.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20 % of ~180 per class


# -- CIFAR ----------------------------------------------------------------------------------------
def _write_cifar10(folder, n_per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = {}
    for name in CIFAR_SPECS["cifar10"]["train"] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        d = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"{i}.png".encode() for i in range(n_per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)  # the archives are protocol-2 pickles
        batches[name] = d
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}, f, protocol=2)
    return batches


def test_cifar10_reads_the_python_archive_format(tmp_path):
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py")
    train = get_dataset("cifar10", root=tmp_path, train=True, augment=False)
    test = get_dataset("cifar10", root=tmp_path, train=False)
    assert len(train) == 20 and len(test) == 4
    spec = CIFAR_SPECS["cifar10"]
    mean, std = torch.tensor(spec["mean"]).view(3, 1, 1), torch.tensor(spec["std"]).view(3, 1, 1)
    # Undo the normalization: the pixels and labels are those written, in batch order.
    raw = batches["data_batch_2"]
    x, y = train[4]
    pixels = (x * std + mean) * 255
    expected = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32).astype(np.float32))
    torch.testing.assert_close(pixels, expected, atol=1e-3, rtol=0)
    assert int(y) == raw[b"labels"][0]
    assert test.y.tolist() == batches["test_batch"][b"labels"]


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 6), ("test", 3)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(range(90, 90 + n)),
             b"coarse_labels": [0] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": []}, f, protocol=2)
    _, _, info = get_dataloaders("cifar100", root=tmp_path, batch_size=4)
    assert info.num_classes == 100 and (info.train_size, info.test_size) == (6, 3)
    assert get_dataset("cifar100", root=tmp_path, train=True).y.tolist() == list(range(90, 96))


def test_cifar_missing_folder_names_folder_and_files(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        get_dataset("cifar10", root=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg and "data_batch_1" in msg and "test_batch" in msg
    assert "\n" not in msg


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(DataNotFoundError, match="posix.system|os.system|system"):
        get_dataset("cifar10", root=tmp_path)


def _cifar_archive(tmp_path):
    src = tmp_path / "src"
    _write_cifar10(src / "cifar-10-batches-py")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(buf.getvalue())
    return archive, hashlib.md5(buf.getvalue()).hexdigest()


def test_cifar_download_verifies_checksum_and_extracts(tmp_path, monkeypatch):
    archive, md5 = _cifar_archive(tmp_path)
    spec = dict(CIFAR_SPECS["cifar10"], url=archive.as_uri(), md5=md5)
    monkeypatch.setitem(CIFAR_SPECS, "cifar10", spec)
    root = tmp_path / "data"
    ds = get_dataset("cifar10", root=root, train=False, download=True)
    assert len(ds) == 4
    assert not [p for p in root.iterdir() if p.name.startswith(".download")]  # temp file removed


def test_cifar_download_with_wrong_checksum_fails(tmp_path, monkeypatch):
    archive, md5 = _cifar_archive(tmp_path)
    monkeypatch.setitem(CIFAR_SPECS, "cifar10", dict(CIFAR_SPECS["cifar10"], url=archive.as_uri(), md5="0" * 32))
    root = tmp_path / "data"
    with pytest.raises(DataNotFoundError, match="checksum"):
        get_dataset("cifar10", root=root, download=True)
    assert not (root / "cifar-10-batches-py").exists()


# -- ImageNet -------------------------------------------------------------------------------------
def test_imagenet_folder_of_class_folders(tmp_path):
    from PIL import Image

    colors = {"n01": (255, 0, 0), "n02": (0, 0, 255)}
    for split in ("train", "val"):
        for cls, color in colors.items():
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i, ext in enumerate((".png", ".JPEG")):
                Image.new("RGB", (40 + 10 * i, 30), color).save(d / f"img{i}{ext}")
    (tmp_path / "train" / "n01" / "notes.txt").write_text("not an image")
    train, val, info = get_dataloaders("imagenet", root=tmp_path, batch_size=2, image_size=16)
    assert info.num_classes == 2 and info.train_size == 4 and info.test_size == 4
    x, y = val.dataset[0]
    assert x.shape == (3, 16, 16)
    # A red image of class n01 (label 0): after un-normalizing, red channel 1 and blue 0.
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rgb = x.mean(dim=(1, 2)) * std + mean
    assert int(y) == 0 and rgb[0] > 0.95 and rgb[2] < 0.05
    xb, yb = next(iter(train))
    assert xb.shape == (2, 3, 16, 16)


def test_imagenet_missing_folder(tmp_path):
    with pytest.raises(DataNotFoundError, match="train"):
        get_dataset("imagenet", root=tmp_path)


# -- text -----------------------------------------------------------------------------------------
def test_text_char_level_windows_and_targets(tmp_path):
    text = "Norm matters — ünïcode ok.\n" * 40
    f = tmp_path / "corpus.txt"
    f.write_text(text, encoding="utf-8")
    _, _, info = get_dataloaders("text", path=str(f), block_size=16, batch_size=4)
    train = get_dataset("text", path=str(f), block_size=16)
    vocab = sorted(set(text))
    assert info.vocab_size == len(vocab) and info.task == "lm" and info.num_classes == len(vocab)
    assert info.extra["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    x, y = train[3]
    decode = "".join(vocab[i] for i in x.tolist())
    assert decode == text[48:64]
    assert torch.equal(y[:-1], x[1:])  # targets are the inputs shifted by one
    assert len(train) == (int(len(text) * 0.9) - 1) // 16


def test_text_byte_level_and_bad_input(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("é" * 100, encoding="utf-8")
    ds = get_dataset("text", path=str(f), level="byte", block_size=8)
    x, _ = ds[0]
    assert x.tolist()[:2] == list("é".encode())
    assert get_dataset_info("text", path=str(f), level="byte", block_size=8).vocab_size == 256
    with pytest.raises(DataNotFoundError):
        get_dataset("text", path=str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataNotFoundError, match="UTF-8"):
        get_dataset("text", path=str(tmp_path / "bad.txt"))
    with pytest.raises(ConfigError):
        get_dataset("text", path=str(f), level="word")


def test_default_corpus_ships_with_python():
    text, source = default_corpus()
    assert len(text) > 100_000 and source
    info = get_dataset_info("text", block_size=64)
    assert info.vocab_size > 60 and info.extra["source"] == source


# -- plumbing -------------------------------------------------------------------------------------
def test_unknown_dataset_and_option():
    with pytest.raises(ConfigError, match="mnist1d"):
        get_dataset("mnist2d")
    with pytest.raises(ConfigError, match="digits"):
        get_dataset("digits", colour=True)
    assert {"mnist1d", "digits", "text", "cifar10", "cifar100", "imagenet"} == set(list_datasets())


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    s = EpochSampler(50, seed=3)
    s.set_epoch(2)
    a = list(s)
    assert sorted(a) == list(range(50))
    t = EpochSampler(50, seed=3)
    t.set_epoch(2)
    assert list(t) == a
    t.set_epoch(3)
    assert list(t) != a
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_loader_epoch_order_is_reproducible():
    tr, _, _ = get_dataloaders("digits", batch_size=500, seed=1, augment=False)
    set_loader_epoch(tr, 4)
    first = next(iter(tr))[1]
    set_loader_epoch(tr, 5)
    other = next(iter(tr))[1]
    set_loader_epoch(tr, 4)
    assert torch.equal(next(iter(tr))[1], first) and not torch.equal(other, first)


def test_random_crop_is_a_zero_padded_shift():
    torch.manual_seed(0)
    x = torch.arange(1.0, 41.0).view(1, 40)
    for _ in range(20):
        y = RandomCrop(4)(x)
        assert y.shape == x.shape
        nz = y[y != 0]
        # the non-zero part is a contiguous run of the original sequence
        start = int(nz[0].item()) - 1
        assert torch.equal(nz, x[0, start:start + len(nz)]) and len(nz) >= 36
    img = torch.randn(3, 8, 8)
    assert RandomCrop(1)(img).shape == img.shape
