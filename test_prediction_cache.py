"""PredictionCache in process: values, rounding, LRU order, invalidation, errors, concurrency."""

import math
import struct
import threading
import time
from collections import OrderedDict
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import LinearModel, ModelError, dot_float32
from server import CACHE_VALUES, MEMO_VALUES, PredictionCache, round_row
from tests.fixtures import run_concurrently

COEFS = torch.tensor([[1.0], [2.0], [3.0]])


def row(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


@pytest.fixture
def cache() -> PredictionCache:
    cache = PredictionCache()
    cache.SetCoefs(COEFS)
    return cache


def test_predict_is_x_times_coefs_as_a_column(cache):
    y, hit = cache.Predict(row(1, 2, 3))
    assert y.shape == (1, 1) and y.dtype == torch.float32
    assert y.item() == 14.0
    assert hit is False


def test_multi_row_x_gives_one_value_per_row_and_caches_as_one_key(cache):
    X = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    y, hit = cache.Predict(X)
    assert y.tolist() == [[14.0], [-2.5]] and not hit
    y_again, hit_again = cache.Predict(X.clone())
    assert torch.equal(y_again, y) and hit_again
    assert cache.Predict(X[:1])[1] is False  # a single row is a different key


def test_same_input_twice_hits_the_second_time(cache):
    assert cache.Predict(row(1, 2, 3))[1] is False
    y, hit = cache.Predict(row(1, 2, 3))
    assert hit is True and y.item() == 14.0


def test_changing_a_returned_y_leaves_the_cache_alone(cache):
    missed, _ = cache.Predict(row(1, 2, 3))
    missed.add_(100)
    hit_once, hit = cache.Predict(row(1, 2, 3))
    hit_once.add_(100)
    assert hit is True
    assert cache.Predict(row(1, 2, 3))[0].item() == 14.0


def test_x_that_requires_grad_gets_answers_outside_its_graph(cache):
    for _ in range(2):  # a miss, then a hit
        y, _ = cache.Predict(row(1, 2, 3).requires_grad_())
        assert y.item() == 14.0 and not y.requires_grad


def test_inputs_equal_after_rounding_to_4_decimals_share_an_entry(cache):
    cache.Predict(row(1, 2, 3))
    y, hit = cache.Predict(row(1.00004, 2.00001, 2.99996))
    assert hit is True and y.item() == 14.0


def test_rounding_happens_before_the_model_sees_x(cache):
    y, _ = cache.Predict(row(0.00004, 0.00006, 0.0))
    assert y.item() == pytest.approx(2 * 0.0001, abs=1e-9)


def test_a_reused_entry_survives_eviction_the_oldest_unused_does_not(cache):
    for i in range(10):
        cache.Predict(row(i, 0, 0))
    assert cache.Predict(row(0, 0, 0))[1] is True  # 0 becomes the most recent
    cache.Predict(row(10, 0, 0))  # the 11th key evicts the least recently used: 1
    assert cache.Predict(row(0, 0, 0))[1] is True
    assert cache.Predict(row(1, 0, 0))[1] is False
    assert cache.stats().evictions == 2  # 10 evicted 1, then 1 evicted 2


def test_capacity_is_a_constructor_argument():
    cache = PredictionCache(capacity=2)
    cache.SetCoefs(COEFS)
    for i in range(3):
        cache.Predict(row(i, 0, 0))
    assert cache.Predict(row(0, 0, 0))[1] is False
    assert cache.stats().size == 2 and cache.stats().capacity == 2


def test_set_coefs_empties_the_cache_and_new_coefs_apply(cache):
    cache.Predict(row(1, 2, 3))
    cache.SetCoefs(torch.tensor([[2.0], [0.0], [0.0]]))
    y, hit = cache.Predict(row(1, 2, 3))
    assert hit is False and y.item() == 2.0
    assert cache.stats().size == 1


def test_set_coefs_with_the_same_values_still_empties_the_cache(cache):
    cache.Predict(row(1, 2, 3))
    cache.SetCoefs(COEFS)
    assert cache.Predict(row(1, 2, 3))[1] is False


def test_counters_count_hits_misses_evictions_and_size(cache):
    for i in range(12):
        cache.Predict(row(i, 0, 0))
    cache.Predict(row(11, 0, 0))
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.size) == (1, 12, 2, 10)


def test_nan_input_is_computed_but_never_cached(cache):
    for _ in range(2):
        y, hit = cache.Predict(row(float("nan"), 0, 0))
        assert math.isnan(y.item()) and hit is False
    assert cache.stats().size == 0


def test_infinite_input_is_computed_and_cached(cache):
    y, _ = cache.Predict(row(float("inf"), 0, 0))
    assert y.item() == float("inf")
    assert cache.Predict(row(float("inf"), 0, 0))[1] is True


def test_predict_before_any_set_coefs_says_so():
    with pytest.raises(ModelError, match="SetCoefs"):
        PredictionCache().Predict(row(1, 2, 3))


@pytest.mark.parametrize(
    "X, message",
    [
        (row(1, 2), "2 values per row but the model takes 3"),
        (torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "4 values per row but the model takes 3"),
        (torch.empty(0, 3), "empty"),
        (torch.empty(1, 0), "empty"),
        (torch.tensor([1.0, 2.0, 3.0]), r"2-D .* shape \(3,\)"),
        (torch.ones(1, 1, 3), r"2-D .* shape \(1, 1, 3\)"),
        ([[1.0, 2.0, 3.0]], "torch.Tensor, not list"),
    ],
)
def test_bad_x_is_refused_with_the_numbers(cache, X, message):
    with pytest.raises(ModelError, match=message):
        cache.Predict(X)


@pytest.mark.parametrize(
    "coefs, message",
    [
        (torch.empty(0, 1), "empty"),
        (torch.tensor([[1.0], [float("nan")]]), r"finite: 1 of 2 .*coefs\[1\] = nan"),
        (torch.tensor([[float("inf")], [float("-inf")]]), r"finite: 2 of 2 .*coefs\[0\] = inf"),
        (torch.ones(3, 2), r"column vector .* \(3, 2\)"),
    ],
)
def test_bad_coefs_are_refused_and_the_old_model_stays(cache, coefs, message):
    with pytest.raises(ModelError, match=message):
        cache.SetCoefs(coefs)
    assert cache.Predict(row(1, 2, 3))[0].item() == 14.0


def test_coefs_are_copied_so_later_changes_to_the_callers_tensor_do_not_leak(cache):
    coefs = torch.tensor([[1.0], [1.0], [1.0]])
    cache.SetCoefs(coefs)
    coefs.fill_(100.0)
    assert cache.Predict(row(1, 2, 3))[0].item() == 6.0


def test_the_lock_is_released_after_an_exception(cache):
    with pytest.raises(ModelError):
        cache.Predict(row(1, 2))
    answered = threading.Event()

    def predict_then_signal() -> None:
        cache.Predict(row(1, 2, 3))
        answered.set()

    threading.Thread(target=predict_then_signal, daemon=True).start()
    assert answered.wait(timeout=5), "Predict from another thread blocked: the lock was left held"


def test_concurrent_predicts_never_see_coefficients_older_than_the_last_returned_set_coefs(cache):
    """Coefs version k are [k, k, k]; X = [1, 2, 3] reveals k as y / 6."""
    versions = 300
    returned = [0]  # the newest version whose SetCoefs has returned
    begun = [0]  # the newest version whose SetCoefs has begun
    failures: list[str] = []
    done = threading.Event()
    deadline = time.monotonic() + 15

    def writer():
        for version in range(1, versions + 1):
            begun[0] = version
            cache.SetCoefs(torch.full((3, 1), float(version)))
            returned[0] = version
        done.set()

    def reader():
        while not done.is_set() and time.monotonic() < deadline:
            oldest_allowed = returned[0]
            y, _ = cache.Predict(row(1, 2, 3))
            newest_allowed = begun[0]
            version = y.item() / 6
            if not oldest_allowed <= version <= newest_allowed:
                failures.append(f"got version {version}, allowed {oldest_allowed}..{newest_allowed}")

    cache.SetCoefs(torch.zeros(3, 1))
    run_concurrently([reader] * 4 + [writer], timeout=20)
    assert done.is_set(), "the writer did not finish in time"
    assert failures == []
    assert cache.Predict(row(1, 2, 3))[0].item() == 6 * versions


# --- the plain-Python float32 path against torch itself ----------------------------------------

float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)
edge_values = st.sampled_from([0.0, -0.0, 0.00005, -0.00005, 0.00015, 1.00005, 2.5e-5, -1e-5, 1e30, -3.4e38])


def bits(value: float) -> bytes:
    return struct.pack("<f", value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 64).flatmap(
        lambda n: st.tuples(
            st.lists(st.one_of(float32s, edge_values), min_size=n, max_size=n),
            st.lists(st.floats(-100, 100, width=32), min_size=n, max_size=n),
        )
    )
)
def test_plain_python_rounding_and_dot_equal_torch_bit_for_bit(x_and_coefs):
    x, coefs = x_and_coefs
    X = torch.tensor([x], dtype=torch.float32)
    rounded = torch.round(X, decimals=4)
    assert [bits(v) for v in round_row(x)] == [bits(v) for v in rounded.flatten().tolist()]
    column = torch.tensor(coefs, dtype=torch.float32).reshape(-1, 1)
    y = (rounded @ column).item()
    assert bits(dot_float32(round_row(x), coefs)) == bits(y)
    tensor_cache, row_cache = PredictionCache(), PredictionCache()
    tensor_cache.SetCoefs(column)
    row_cache.SetCoefs(column)
    assert bits(tensor_cache.Predict(X)[0].item()) == bits(y)
    for _ in range(2):  # computed in plain Python, then cached
        assert bits(row_cache.predict_row(x)[0]) == bits(y)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 16).flatmap(
        lambda n: st.tuples(
            st.lists(st.lists(st.one_of(float32s, edge_values), min_size=n, max_size=n), min_size=1, max_size=20),
            st.lists(st.floats(-100, 100, width=32), min_size=n, max_size=n),
        )
    )
)
def test_a_batch_gets_each_rows_own_float32_sum_bit_for_bit(rows_and_coefs):
    """The linear model's batch path (ModelInfer) answers every row exactly as the row path (Predict) does."""
    rows, coefs = rows_and_coefs
    keys = [tuple(round_row(row)) for row in rows]
    batch = LinearModel(coefs).run_rows(keys)
    assert [bits(y) for (y,) in batch] == [bits(dot_float32(key, coefs)) for key in keys]


def test_remembered_keys_keep_the_sign_of_zero(cache):
    """0.0 == -0.0, so rows holding zeros must not be answered from the remembered roundings."""
    for x in ([0.00001, 0.0], [-0.00001, -0.0], [0.0, 0.0], [-0.0, -0.0]):
        cache.SetCoefs(torch.ones(2, 1))  # empties the cache: y comes from this row's own rounding
        expected = (torch.round(torch.tensor([x]), decimals=4) @ torch.ones(2, 1)).item()
        for _ in range(2):
            assert bits(cache.predict_row(x)[0]) == bits(expected)
        assert not any(0.0 in raw for raw in cache._memo)


def test_rows_the_model_refuses_are_not_remembered(cache):
    """Nothing a request sends is kept unless it is a valid row for the model served."""
    for width in (1, 2, 4, 1000):
        for _ in range(3):
            with pytest.raises(ModelError):
                cache.predict_row([0.5] * width)
    assert cache._memo == {}
    cache.predict_row([0.5, 1.5, 2.5])
    assert list(cache._memo) == [(0.5, 1.5, 2.5)]


def test_the_memo_of_roundings_is_bounded_in_values_whatever_the_width():
    width = MEMO_VALUES // 4 + 1
    wide = PredictionCache()
    wide.SetCoefs(torch.ones(width, 1))
    for i in range(12):
        wide.predict_row([i + 0.5] * width)
        assert wide._memo_values <= MEMO_VALUES
    assert 0 < len(wide._memo) <= 3


def test_a_row_wider_than_the_memos_budget_is_not_remembered():
    width = MEMO_VALUES + 1
    wide = PredictionCache()
    wide.SetCoefs(torch.ones(width, 1))
    wide.predict_row([0.5] * width)
    assert wide._memo == {} and wide._memo_values == 0


def test_the_cache_is_bounded_in_values_as_well_as_entries():
    """Ten rows of a third of the budget cannot all stay: the least recently used make room."""
    width = CACHE_VALUES // 3
    wide = PredictionCache(capacity=10)
    wide.SetCoefs(torch.ones(width, 1))
    for i in range(5):
        assert wide.predict_row([i + 0.5] * width) == (float(width * (i + 0.5)), False)
    stats = wide.stats()
    assert (stats.size, stats.evictions) == (3, 2)
    assert wide.predict_row([4.5] * width)[1] and not wide.predict_row([0.5] * width)[1]


def test_a_row_wider_than_the_whole_budget_is_answered_but_not_kept():
    width = CACHE_VALUES + 1
    wide = PredictionCache()
    wide.SetCoefs(torch.ones(width, 1))
    assert wide.predict_row([0.5] * width) == (float(width * 0.5), False)
    assert wide.stats().size == 0


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_plain_python_rounding_passes_non_finite_values_through_like_torch(value):
    expected = torch.round(torch.tensor([value, 1.23456]), decimals=4).tolist()
    assert [bits(v) for v in round_row([value, 1.23456])] == [bits(v) for v in expected]


# --- random sequences against a plain reference ------------------------------------------------


class ReferenceCache:
    """An ordered-dict LRU with exact arithmetic: what PredictionCache must agree with."""

    def __init__(self, capacity: int):
        self.capacity, self.evictions = capacity, 0
        self.entries: OrderedDict[tuple[float, ...], Fraction] = OrderedDict()
        self.coefs: list[float] = []

    def set_coefs(self, coefs):
        self.coefs, self.entries = coefs, OrderedDict()

    def predict(self, x):
        key = tuple(torch.round(torch.tensor(x, dtype=torch.float32), decimals=4).tolist())
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key], True
        y = sum((Fraction(v) * Fraction(c) for v, c in zip(key, self.coefs, strict=True)), Fraction(0))
        self.entries[key] = y
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
            self.evictions += 1
        return y, False


WIDTH = 3
small_values = st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.00004, 1.99996, 0.12345, 3.0])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.lists(st.floats(-10, 10, width=32), min_size=WIDTH, max_size=WIDTH)),
        st.tuples(st.just("predict"), st.lists(small_values, min_size=WIDTH, max_size=WIDTH)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), operations)
def test_random_sequences_agree_with_the_reference_lru(capacity, ops):
    cache, reference = PredictionCache(capacity), ReferenceCache(capacity)
    cache.SetCoefs(torch.ones(WIDTH, 1))
    reference.set_coefs([1.0] * WIDTH)
    for operation, values in ops:
        if operation == "set":
            cache.SetCoefs(torch.tensor(values).reshape(-1, 1))
            reference.set_coefs(torch.tensor(values).tolist())
            continue
        y, hit = cache.Predict(torch.tensor([values]))
        expected_y, expected_hit = reference.predict(values)
        assert hit == expected_hit
        magnitude = sum(abs(Fraction(v) * Fraction(c)) for v, c in zip(values, reference.coefs, strict=True)) + 1
        assert abs(Fraction(y.item()) - expected_y) <= magnitude * Fraction(1, 2**21)
    stats = cache.stats()
    assert (stats.size, stats.evictions) == (len(reference.entries), reference.evictions)
