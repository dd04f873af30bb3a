"""Federated partitions with flwr-datasets partitioners: sizes, seeds, label skew, histogram."""

import io

import numpy as np
import pytest
from rich.console import Console

from fedgrow_core.data.partitions import federate, label_histogram, make_partitioner, print_label_histogram
from fedgrow_core.data.sources import load_data_source


@pytest.fixture(scope="module")
def digits():
    return load_data_source("digits")


def _skew(counts):
    """Mean total-variation distance between each client's label distribution and the pool's."""
    c = counts.to_numpy(dtype=float)
    pool = c.sum(0) / c.sum()
    per_client = c / c.sum(1, keepdims=True)
    return float(0.5 * np.abs(per_client - pool).sum(1).mean())


def test_dirichlet_skews_labels_more_as_alpha_falls(digits):
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        # average over seeds: one draw of a Dirichlet can be unlucky
        skews.append(np.mean([_skew(label_histogram(federate(digits, 5, alpha=alpha, seed=s))) for s in range(3)]))
    assert skews[0] < 0.1  # near IID
    assert skews[0] < skews[1] < skews[2]
    assert skews[2] > 0.4  # strongly skewed


def test_partitions_cover_the_pool_and_hold_out_a_global_test(digits):
    fed = federate(digits, 4, "iid", seed=0, global_test_fraction=0.1, client_test_fraction=0.25)
    assert len(fed.global_test) == pytest.approx(180, abs=1)
    counts = label_histogram(fed)
    assert int(counts.to_numpy().sum()) == 1797 - len(fed.global_test)
    for pid in range(4):
        split = fed.client(pid)
        total = len(split["train"]) + len(split["test"])
        assert total == int(counts.loc[pid].sum())
        assert len(split["test"]) == pytest.approx(0.25 * total, abs=1)
    # every client's rows are distinct images; none is in the global test set
    seen = set()
    for pid in range(4):
        for split in fed.client(pid).values():
            for img in split.with_format("numpy")["image"]:
                seen.add(np.asarray(img).tobytes())
    held_out = {np.asarray(img).tobytes() for img in fed.global_test.with_format("numpy")["image"]}
    assert len(seen & held_out) <= 5  # sklearn digits holds a handful of duplicate images


def test_source_test_split_is_the_global_test(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (60, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", image=images, label=np.arange(60) % 3)
    data = load_data_source(str(tmp_path / "a.npz"))
    data["test"] = data["train"].select(range(10))
    fed = federate(data, 2, "iid")
    assert len(fed.global_test) == 10
    assert int(label_histogram(fed).to_numpy().sum()) == 60


def test_seeded_and_reproducible(digits):
    a = label_histogram(federate(digits, 3, alpha=0.3, seed=7))
    b = label_histogram(federate(digits, 3, alpha=0.3, seed=7))
    c = label_histogram(federate(digits, 3, alpha=0.3, seed=8))
    assert a.equals(b)
    assert not a.equals(c)
    x = federate(digits, 3, alpha=0.3, seed=7).client(1)["test"]["label"]
    y = federate(digits, 3, alpha=0.3, seed=7).client(1)["test"]["label"]
    assert x == y


def test_shards_give_each_client_few_classes(digits):
    counts = label_histogram(federate(digits, 5, "shards", shards_per_partition=2, seed=0))
    share_of_top2 = np.sort(counts.to_numpy(), axis=1)[:, -2:].sum(1) / counts.to_numpy().sum(1)
    assert (share_of_top2 > 0.9).all()


def test_rotten_tomatoes_dirichlet_histogram_prints():
    fed = federate(load_data_source("rotten-tomatoes"), 3, alpha=0.5, seed=0)
    out = io.StringIO()
    counts = print_label_histogram(fed, Console(file=out, width=120))
    assert list(counts.columns) == ["rotten", "fresh"]
    assert int(counts.to_numpy().sum()) + len(fed.global_test) == 12_808
    text = out.getvalue()
    assert "rotten" in text and str(int(counts.loc[2].sum())) in text


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "zipf", "num_partitions": 3}, "unknown partitioner 'zipf'"),
        ({"name": "iid", "num_partitions": 0}, "num_partitions must be an integer >= 1, got 0"),
        ({"name": "dirichlet", "num_partitions": 3, "alpha": 0.0}, "Dirichlet alpha must be > 0, got 0.0"),
        ({"name": "shards", "num_partitions": 3, "shards_per_partition": 0}, "shards_per_partition must be >= 1"),
    ],
)
def test_bad_partitioner_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_partitioner(**kwargs)


def test_bad_fraction_and_partition_id(digits):
    with pytest.raises(ValueError, match="client_test_fraction must be in \\(0, 1\\), got 1.5"):
        federate(digits, 2, client_test_fraction=1.5)
    with pytest.raises(ValueError, match="partition_id must be in \\[0, 2\\), got 2"):
        federate(digits, 2, "iid").client(2)


def test_shards_per_partition_reaches_the_partitioner():
    """The run config's ``shards-per-partition`` decides how many label shards each client gets."""
    from fedgrow_core.clients.setup import client_rows
    from fedgrow_core.run_config import RunConfig

    def partition_0(shards: int):
        run = RunConfig(task="image", dataset="digits", partitioner="shards", shards_per_partition=shards)
        return client_rows(run, 0, 4)[0]

    one, two, eight = partition_0(1), partition_0(2), partition_0(8)
    assert one["image"] != two["image"]  # another shard count, other rows
    # more, smaller shards of the label-sorted rows: more of the 10 classes per client
    assert len(set(eight["label"])) > len(set(one["label"]))
