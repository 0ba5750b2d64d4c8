import itertools
import random

import pytest

from compress.allocate import choose_forms


def brute_force(bits, errors, budget):
    best = None
    for choice in itertools.product(*[range(len(b)) for b in bits]):
        if sum(bits[i][j] for i, j in enumerate(choice)) <= budget:
            error = sum(errors[i][j] for i, j in enumerate(choice))
            if best is None or error < best[1]:
                best = (list(choice), error)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_the_choice_equals_brute_force_and_meets_the_budget(seed):
    rng = random.Random(seed)
    layers = rng.randint(2, 5)
    bits = [[rng.randint(1, 40) * 16 for _ in range(rng.randint(1, 4))] for _ in range(layers)]
    errors = [[rng.uniform(0, 10) for _ in b] for b in bits]
    low, high = sum(min(b) for b in bits), sum(max(b) for b in bits)
    budget = rng.randint(low, high)
    chosen, error = choose_forms(bits, errors, budget, units=budget)  # one step per bit: exact
    assert sum(bits[i][j] for i, j in enumerate(chosen)) <= budget
    expected = brute_force(bits, errors, budget)
    assert error == pytest.approx(expected[1], abs=1e-9)
    coarse, coarse_error = choose_forms(bits, errors, budget, units=64)  # coarse steps: still within the budget
    assert sum(bits[i][j] for i, j in enumerate(coarse)) <= budget and coarse_error >= error - 1e-9


def test_a_budget_below_the_smallest_forms_is_refused():
    with pytest.raises(ValueError, match="over the budget"):
        choose_forms([[10, 20], [5]], [[1.0, 0.5], [0.0]], budget=14)
    with pytest.raises(ValueError, match="non-empty menu"):
        choose_forms([[10], []], [[1.0], []], budget=100)
