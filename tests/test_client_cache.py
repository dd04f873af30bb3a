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


def test_the_least_recently_used_go_first_and_the_one_in_use_always_stays():
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


def test_the_budget_comes_from_the_environment_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert budget_bytes() == DEFAULT_BUDGET_MB * 2**20
    monkeypatch.setenv(BUDGET_ENV, "3")
    assert ClientCache().budget == 3 * 2**20
    monkeypatch.setenv(BUDGET_ENV, "-1")
    with pytest.raises(ValueError, match=f"{BUDGET_ENV} = '-1': expected a whole number of megabytes >= 0"):
        budget_bytes()
