import numpy as np
import pytest

from capvqa.ops.patch_sampling import item_rng, sample_patch_sets


def test_rows_are_sorted_distinct_and_in_range():
    rng = item_rng(42, "item", "patches")
    sets = sample_patch_sets(np.random.default_rng(0).random(576), 20, 100, rng)
    assert sets.shape == (100, 20)
    assert (sets >= 0).all() and (sets < 576).all()  # indices over patches only: CLS is never a candidate
    assert all(len(set(row)) == 20 for row in sets)
    assert (np.diff(sets, axis=1) > 0).all()  # spatial order kept


def test_zero_relevance_patches_are_never_drawn():
    relevance = np.zeros(50)
    relevance[[3, 7, 11, 20, 40]] = [0.1, 0.2, 0.3, 0.4, 0.5]
    sets = sample_patch_sets(relevance, 3, 500, item_rng(1, "x", "patches"))
    assert set(np.unique(sets)) <= {3, 7, 11, 20, 40}


def test_fewer_positive_patches_than_requested_keeps_them_all():
    relevance = np.array([0.0, 1.0, 0.0, 2.0])
    sets = sample_patch_sets(relevance, 3, 5, item_rng(1, "x", "patches"))
    assert sets.shape == (5, 2) and (sets == [1, 3]).all()


def test_all_zero_relevance_falls_back_to_uniform():
    sets = sample_patch_sets(np.zeros(10), 4, 200, item_rng(1, "x", "patches"))
    assert sets.shape == (200, 4)
    assert len(np.unique(sets)) == 10


def test_single_draw_frequencies_follow_relevance():
    sets = sample_patch_sets(np.array([1.0, 3.0]), 1, 20000, item_rng(7, "freq", "patches"))
    assert np.mean(sets[:, 0] == 1) == pytest.approx(0.75, abs=0.02)


def test_item_streams_depend_on_seed_and_item_only():
    a = sample_patch_sets(np.ones(30), 5, 4, item_rng(42, "item-a", "patches"))
    again = sample_patch_sets(np.ones(30), 5, 4, item_rng(42, "item-a", "patches"))
    other_item = sample_patch_sets(np.ones(30), 5, 4, item_rng(42, "item-b", "patches"))
    other_seed = sample_patch_sets(np.ones(30), 5, 4, item_rng(43, "item-a", "patches"))
    assert (a == again).all()
    assert not (a == other_item).all() and not (a == other_seed).all()


def test_a_relative_relevance_difference_changes_draws_at_the_documented_rate():
    """About 0.56 * k * eps of the draws change when every weight moves by eps (relative); the module
    docstring derives this rate, and the run-to-run guarantees of distributed runs rest on it."""
    k, eps, draws = 20, 1e-3, 10000
    noise = np.random.default_rng(3)
    weights = np.exp(noise.normal(0, 1, 576))
    moved = weights * np.exp(eps * noise.standard_normal(576))
    before = sample_patch_sets(weights, k, draws, item_rng(5, "rate", "patches"))
    after = sample_patch_sets(moved, k, draws, item_rng(5, "rate", "patches"))
    changed = np.mean((before != after).any(axis=1))
    assert 0.5 < changed / (0.56 * k * eps) < 2
