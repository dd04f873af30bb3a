"""The ClientApp's per-process client cache: least recently used dropped first, within a byte budget."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from torch import nn

from client_app.client_cache import BUDGET_ENV, DEFAULT_BUDGET_MB, ClientCache, budget_bytes, footprint


class Holder:
    """A client-like object: a module, an optimiser with state, a dataset, and a nested setup."""

    def __init__(self, width: int):
        self.model = nn.Linear(width, width)
        self.optimizer = torch.optim.AdamW(self.model.parameters())
        self.model(torch.ones(1, width)).sum().backward()
        self.optimizer.step()  # two moment tensors per parameter, and a step count
        self.rows = Dataset.from_dict({"x": list(range(100))})
        self.setup = type("Setup", (), {})()
        self.setup.small = nn.Linear(width, 1)
        self.same_model = self.model  # reached twice: counted once


def _independent_bytes(h: Holder) -> int:
    params = sum(p.numel() * p.element_size() for p in h.model.parameters())
    moments = sum(
        t.numel() * t.element_size() for s in h.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    small = sum(p.numel() * p.element_size() for p in h.setup.small.parameters())
    return params + moments + small + h.rows.data.nbytes


def test_footprint_counts_modules_optimiser_state_rows_and_nested_objects_once():
    h = Holder(64)
    assert footprint(h) == _independent_bytes(h)
    assert footprint(h, depth=1) == _independent_bytes(h) - sum(p.numel() * 4 for p in h.setup.small.parameters())


def test_the_least_recently_used_go_first_and_the_node_in_use_always_stays():
    one = footprint(Holder(32))
    cache = ClientCache(budget=int(2.5 * one))
    built = []

    def build(name):
        built.append(name)
        return Holder(32)

    for name in ("a", "b", "c"):
        cache.get(name, lambda n=name: build(n))
    assert cache.keys() == ["b", "c"] and cache.nbytes <= cache.budget  # "a" was the least recently used
    cache.get("b", lambda: build("b again"))  # kept: not rebuilt, now the most recent
    cache.get("d", lambda: build("d"))
    assert cache.keys() == ["b", "d"] and built == ["a", "b", "c", "d"]
    tiny = ClientCache(budget=0)
    tiny.get("x", lambda: Holder(8))
    assert tiny.keys() == ["x"]  # over the budget on its own, but in use
    cache.drop(lambda key: key == "b")
    assert cache.keys() == ["d"]


def test_a_nodes_objects_stay_together_while_it_is_served():
    # a node's setup and client: (node, "setup") then (node, "client"); with a budget of 0 both stay while the
    # node is in use, and both go when another node is served
    cache = ClientCache(budget=0, group=lambda key: key[0])
    cache.get(("n1", "setup"), lambda: Holder(16))
    cache.get(("n1", "client"), lambda: Holder(16))
    assert cache.keys() == [("n1", "setup"), ("n1", "client")]
    cache.get(("n2", "setup"), lambda: Holder(16))
    assert cache.keys() == [("n2", "setup")]


def test_an_object_is_counted_at_its_current_size_when_the_cache_is_trimmed():
    small = Holder(32)
    fresh = nn.Linear(64, 64)
    grows = type("Client", (), {})()
    grows.model, grows.optimizer = fresh, torch.optim.AdamW(fresh.parameters())  # no moments yet
    before = footprint(grows)
    cache = ClientCache(budget=footprint(small) + before + 1000)
    cache.get("small", lambda: small)
    cache.get("grows", lambda: grows)
    assert cache.keys() == ["small", "grows"]  # both fit
    fresh(torch.ones(1, 64)).sum().backward()
    grows.optimizer.step()  # the moments appear after the object was handed out and kept
    assert footprint(grows) > 2 * before
    cache.get("small", lambda: small)  # the next use trims, at the grown size
    assert cache.keys() == ["small"]


def test_only_the_objects_handed_out_since_the_last_trim_are_measured_again(monkeypatch):
    import client_app.client_cache as module

    measured = []
    real = module.footprint
    monkeypatch.setattr(module, "footprint", lambda obj, depth=2: measured.append(obj.name) or real(obj, depth))
    holders = {}
    for name in "abcd":
        holders[name] = Holder(8)
        holders[name].name = name
    cache = ClientCache(budget=10 * footprint(holders["a"]), group=lambda key: key[0])
    for key in ("a1", "b1", "c1"):
        cache.get(key, lambda k=key: holders[k[0]])
    measured.clear()
    cache.get("d1", lambda: holders["d"])
    assert sorted(measured) == ["c", "d"]  # the new object, and the one handed out before it; not a, b
    measured.clear()
    cache.get("a1", lambda: holders["a"])
    assert sorted(measured) == ["a", "d"]


def test_the_budget_comes_from_the_environment_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert budget_bytes() == DEFAULT_BUDGET_MB * 2**20
    monkeypatch.setenv(BUDGET_ENV, "3")
    assert ClientCache().budget == 3 * 2**20
    monkeypatch.setenv(BUDGET_ENV, "-1")
    with pytest.raises(ValueError, match=f"{BUDGET_ENV} = '-1': expected a whole number of megabytes >= 0"):
        budget_bytes()
