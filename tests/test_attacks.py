"""The benchmark's attacks: their norms and directions against direct computations."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from benchmarks.attacks import alie_z, clip_reach, little_is_enough, random_direction, reverse_mean, sign_flip
from server_app.trust.bounded_influence import clip_bound, clipped, update_norm


def test_clip_reach_is_the_largest_update_the_median_clip_lets_through():
    others = [1.0, 3.0, 2.0, 5.0]
    reach = clip_reach(others, 2.0)
    assert reach == 2.0 * 3.0  # the median of (1, 2, 3, 5, reach) is 3 once reach is the largest
    assert clip_bound([*others, reach], 0.0, 2.0) == pytest.approx(reach)  # so the server keeps it whole
    assert clip_reach([1.0, 2.0], 2.0) == 4.0  # of three, the larger honest norm is the median
    assert math.isinf(clip_reach([1.0], 0.0))  # no clip, no reach


@pytest.mark.parametrize(("n", "expected"), [(3, norm.ppf(2 / 3)), (5, norm.ppf(3 / 5)), (10, norm.ppf(5 / 10))])
def test_alie_z_is_baruch_et_als_z_max(n, expected):
    # s = floor(n/2 + 1) - f nodes to win over, z = Phi^-1((n - s) / n), f = 1
    assert alie_z(n) == pytest.approx(expected)


def test_the_attacks_point_where_they_claim_at_the_norm_they_claim():
    rng = np.random.default_rng(0)
    updates = rng.standard_normal((3, 50))
    flipped = sign_flip(updates, 1, 7.0, rng)
    assert np.linalg.norm(flipped) == pytest.approx(7.0)
    cosine = flipped @ updates[1] / (np.linalg.norm(flipped) * np.linalg.norm(updates[1]))
    assert cosine == pytest.approx(-1.0)
    reversed_mean = reverse_mean(updates, 1, 7.0, rng)
    mean = updates.mean(axis=0)
    assert reversed_mean @ mean / (7.0 * np.linalg.norm(mean)) == pytest.approx(-1.0)
    assert np.linalg.norm(random_direction(updates, 1, 7.0, rng)) == pytest.approx(7.0)
    shift = little_is_enough(updates, 1, 7.0, rng)
    np.testing.assert_allclose(shift, mean - alie_z(3) * updates.std(axis=0))


def test_a_reply_at_the_reach_is_not_clipped_and_one_beyond_it_is():
    sent = {"w": np.zeros(4, np.float32)}
    reach = clip_reach([1.0, 2.0], 2.0)
    at = {"w": np.array([reach, 0, 0, 0], np.float32)}
    beyond = {"w": np.array([2 * reach, 0, 0, 0], np.float32)}
    bound_at = clip_bound([1.0, 2.0, update_norm(at, sent)], 0.0, 2.0)
    assert update_norm(at, sent) <= bound_at  # the server passes it through whole
    assert clipped(at, sent, update_norm(at, sent), bound_at)["w"] is at["w"]
    bound_beyond = clip_bound([1.0, 2.0, update_norm(beyond, sent)], 0.0, 2.0)
    assert update_norm(beyond, sent) > bound_beyond  # twice the reach is cut back to it
    assert update_norm(clipped(beyond, sent, update_norm(beyond, sent), bound_beyond), sent) == pytest.approx(reach)
