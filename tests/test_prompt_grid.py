"""The ServerApp's grid collects a round's replies as they arrive (every 0.05 s, not Flower's 3 s)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import server_app.orchestration.prompt_grid as prompt_grid
from server_app.orchestration.prompt_grid import POLL_SECONDS, PromptGrid


class SlowNodes:
    """A grid whose node ``i``'s reply arrives at the ``i``-th pull; records every call."""

    def __init__(self, arrive_at: dict[str, int]):
        self.arrive_at, self.pulls, self.closed, self.asked = arrive_at, 0, False, []

    def push_messages(self, messages):
        return [m.id for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        self.asked.append(list(ids))
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
            for i in ids
            if self.arrive_at.get(i) == self.pulls
        ]

    def get_node_ids(self):
        return [1, 2, 3]

    def close(self):
        self.closed = True


@pytest.fixture
def clock(monkeypatch):
    """A fake monotonic clock that ``time.sleep`` advances; records the sleeps."""
    state = SimpleNamespace(now=0.0, sleeps=[])

    def sleep(seconds):
        state.sleeps.append(seconds)
        state.now += seconds

    monkeypatch.setattr(prompt_grid.time, "sleep", sleep)
    monkeypatch.setattr(prompt_grid.time, "monotonic", lambda: state.now)
    return state


def _messages(*ids):
    return [SimpleNamespace(id=i) for i in ids]


def test_replies_are_pulled_every_poll_until_all_arrived(clock):
    nodes = SlowNodes({"a": 1, "b": 3, "c": 4})
    grid = PromptGrid(nodes)
    replies = grid.send_and_receive(_messages("a", "b", "c"), timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert nodes.pulls == 4 and clock.sleeps == [POLL_SECONDS] * 3  # Flower's own grid sleeps 3 s each time
    # each pull asks for the replies still missing, in the order the messages were pushed (an in-process grid
    # serves them in that order, so a run does not depend on the iteration order of a set of ids)
    assert nodes.asked == [["a", "b", "c"], ["b", "c"], ["b", "c"], ["c"]]


def test_messages_go_out_at_once_and_each_reply_is_handed_over_when_pulled(clock):
    nodes = SlowNodes({"a": 1, "b": 3})
    pushed = []
    nodes.push_messages = lambda messages: pushed.extend(m.id for m in messages) or list(pushed)
    replies = PromptGrid(nodes).send_and_receive(_messages("a", "b"), timeout=60)
    assert pushed == ["a", "b"] and nodes.pulls == 0  # pushed before anything is asked of the replies
    first = next(iter(replies))
    assert first.metadata.reply_to_message_id == "a" and nodes.pulls == 1  # not held back until "b" came
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b"] and nodes.pulls == 3
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b"] and nodes.pulls == 3  # read again


def test_the_replies_are_a_sequence_like_flowers_list(clock):
    nodes = SlowNodes({"a": 2, "b": 3})
    replies = PromptGrid(nodes).send_and_receive(_messages("a", "b"), timeout=60)
    assert len(replies) == 2 and nodes.pulls == 3  # len waits for every reply, as Flower's list is whole
    assert bool(replies) and replies[1].metadata.reply_to_message_id == "b"
    assert [r.metadata.reply_to_message_id for r in replies[:]] == ["a", "b"] and nodes.pulls == 3


def test_replies_nobody_read_are_pulled_before_the_next_push(clock):
    nodes = SlowNodes({"a": 2})
    grid = PromptGrid(nodes)
    grid.send_and_receive(_messages("a"), timeout=60)  # never read, as a strategy might leave its evaluate replies
    assert nodes.pulls == 0
    grid.send_and_receive(_messages("c"), timeout=60)
    assert nodes.asked[:2] == [["a"], ["a"]]  # the first call's wait ran to its end before anything new went out


def test_a_reply_that_came_while_the_caller_checked_past_the_timeout_is_kept(clock):
    nodes = SlowNodes({"a": 1, "b": 2})
    replies = PromptGrid(nodes, poll=0.5).send_and_receive(_messages("a", "b"), timeout=2.0)
    seen = []
    for reply in replies:
        seen.append(reply.metadata.reply_to_message_id)
        clock.now += 5.0  # checking "a" takes the caller past the timeout; "b" arrived meanwhile
    assert seen == ["a", "b"] and nodes.pulls == 2


def test_the_wait_ends_at_the_timeout_with_the_replies_that_came(clock):
    nodes = SlowNodes({"a": 1, "b": 10_000})
    replies = PromptGrid(nodes, poll=0.5).send_and_receive(_messages("a", "b"), timeout=2.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert clock.now == pytest.approx(2.0) and all(s <= 0.5 for s in clock.sleeps)


def test_everything_else_is_the_wrapped_grids():
    nodes = SlowNodes({})
    grid = PromptGrid(nodes)
    assert list(grid.get_node_ids()) == [1, 2, 3]
    grid.close()
    assert nodes.closed
