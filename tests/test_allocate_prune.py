import math

import pytest
import torch

from compress.allocate import lorap_attention_ranks, welore_ranks
from compress.prune import channel_scores, channels_to_keep, prune_mlp_weights


def heavy(n: int, power: float = 2.0) -> torch.Tensor:
    """sigma_i = i^-power: a heavy-tailed (very low-rank) spectrum."""
    return torch.arange(1, n + 1, dtype=torch.float64) ** -power


def linear(n: int) -> torch.Tensor:
    """A slowly, evenly decaying spectrum (normalised it is a straight line from 1 to 0)."""
    return torch.linspace(1.0, 0.5, n, dtype=torch.float64)


def welore_params(ranks: dict, shapes: dict) -> int:
    return sum(m * n if ranks[name] is None else ranks[name] * (m + n) for name, (m, n) in shapes.items())


SHAPES = {"q": (64, 64), "k": (32, 64), "gate": (96, 48), "up": (96, 48), "down": (48, 96), "v": (32, 64)}
SPECTRA = {"q": heavy(64), "k": heavy(32, 1.5), "gate": heavy(48, 0.7), "up": linear(48),
           "down": torch.ones(48, dtype=torch.float64), "v": heavy(32, 0.3)}


@pytest.mark.parametrize("budget", [0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 0.97])
def test_welore_meets_budget_within_one_rank_and_respects_shapes(budget):
    ranks = welore_ranks(SPECTRA, SHAPES, budget)
    assert set(ranks) == set(SHAPES)
    target = budget * sum(m * n for m, n in SHAPES.values())
    used = welore_params(ranks, SHAPES)
    assert used <= target
    lrc = [name for name, r in ranks.items() if r is not None]
    assert lrc, "some layer must be factorized below budget 1"
    assert target - used < max(sum(SHAPES[name]) for name in lrc)  # within one rank of one layer
    for name, r in ranks.items():
        m, n = SHAPES[name]
        if r is not None:
            assert 1 <= r <= min(m, n)
            assert r * (m + n) < m * n  # an LRC always saves parameters


def test_welore_full_budget_keeps_everything_dense():
    assert all(r is None for r in welore_ranks(SPECTRA, SHAPES, 1.0).values())


def test_welore_totals_grow_with_budget():
    totals = [welore_params(welore_ranks(SPECTRA, SHAPES, b / 10), SHAPES) for b in range(3, 10)]
    assert all(a < b for a, b in zip(totals, totals[1:])), totals


@pytest.mark.parametrize("budget", [0.2, 0.35, 0.5, 0.65])
def test_welore_heavy_tails_get_lower_ranks_than_flat_spectra(budget):
    shapes = {name: (64, 64) for name in ("steep", "mild", "even", "flat")}
    spectra = {"steep": heavy(64, 2.0), "mild": heavy(64, 0.5), "even": linear(64),
               "flat": torch.full((64,), 3.0, dtype=torch.float64)}
    ranks = welore_ranks(spectra, shapes, budget)
    full = {name: 64 if r is None else r for name, r in ranks.items()}  # a dense layer keeps every direction
    assert full["steep"] <= full["mild"] <= full["even"] <= full["flat"], ranks
    if budget >= 0.35:
        assert ranks["flat"] is None  # a flat spectrum has nothing to drop: it stays a dense N-LRC
    if budget >= 0.5:
        assert full["steep"] < full["mild"] < full["even"], ranks


def test_welore_uses_one_global_threshold():
    # Equal shapes and no layer near the dense limit: the kept directions are the globally largest normalised values.
    shapes = {f"w{i}": (64, 64) for i in range(4)}
    spectra = {f"w{i}": heavy(64, p) for i, p in enumerate((0.8, 1.0, 1.5, 2.5))}
    budget = 0.25
    ranks = welore_ranks(spectra, shapes, budget)
    assert all(r is not None for r in ranks.values())
    assert sum(ranks.values()) == math.floor(budget * 4 * 64 * 64 / 128)
    normalised = {name: (s - s.min()) / (s.max() - s.min()) for name, s in spectra.items()}
    kept = min(normalised[name][:r].min().item() for name, r in ranks.items())
    dropped = max(normalised[name][r:].max().item() for name, r in ranks.items())
    assert kept >= dropped


def test_welore_accepts_unsorted_spectra():
    generator = torch.Generator().manual_seed(0)
    shuffled = {name: s[torch.randperm(len(s), generator=generator)] for name, s in SPECTRA.items()}
    assert welore_ranks(shuffled, SHAPES, 0.5) == welore_ranks(SPECTRA, SHAPES, 0.5)


def test_welore_flat_layers_factorized_only_when_budget_forces_it():
    shapes = {"a": (64, 64), "b": (64, 64)}
    flat = torch.ones(64, dtype=torch.float64)
    ranks = welore_ranks({"a": flat, "b": flat}, shapes, 0.3)  # no heavy-tailed layer can absorb the cut
    assert all(r is not None for r in ranks.values())
    used = welore_params(ranks, shapes)
    assert 0.3 * 2 * 64 * 64 - 128 < used <= 0.3 * 2 * 64 * 64


def test_welore_rejects_an_unreachable_budget():
    with pytest.raises(ValueError, match="rank 1"):
        welore_ranks(SPECTRA, SHAPES, 0.01)


MHA = 4096


def square(d: int) -> dict:
    return {name: (d, d) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}


def test_lorap_reproduces_the_papers_llama7b_ranks():
    assert lorap_attention_ranks(square(MHA), 0.5) == {"q_proj": 512, "k_proj": 512, "v_proj": 1536, "o_proj": 1536}
    assert lorap_attention_ranks(square(MHA), 0.8) == {"q_proj": 1228, "k_proj": 1228, "v_proj": None, "o_proj": None}


@pytest.mark.parametrize("d", [768, 2048, 4096, 5120])
def test_lorap_matches_the_authors_floor_convention(d):
    for percent in range(1, 100):
        p = percent / 100
        k_att = math.floor(p * d / 2)
        k_max, k_min = math.floor(k_att * 6 / 4), math.floor(k_att * 2 / 4)
        ranks = lorap_attention_ranks(square(d), p)
        if k_max >= d / 2:
            qk = math.floor(p * d) - d // 2
            expected = {"q_proj": qk, "k_proj": qk, "v_proj": None, "o_proj": None}
        else:
            expected = {"q_proj": k_min, "k_proj": k_min, "v_proj": k_max, "o_proj": k_max}
        assert ranks == expected, (d, p)


def lorap_params(ranks: dict, shapes: dict) -> int:
    return sum(m * n if ranks[name] is None else ranks[name] * (m + n) for name, (m, n) in shapes.items())


@pytest.mark.parametrize("hidden,kv", [(64, 16), (2048, 512), (4096, 1024), (3072, 1024)])
def test_lorap_gqa_stays_within_budget(hidden, kv):
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden)}
    dense = sum(m * n for m, n in shapes.values())
    for percent in range(10, 101, 5):
        budget = percent / 100
        ranks = lorap_attention_ranks(shapes, budget)
        assert lorap_params(ranks, shapes) <= budget * dense
        for name, r in ranks.items():
            if r is not None:
                m, n = shapes[name]
                assert 1 <= r < min(m, n) and r * (m + n) < m * n
        assert ranks["o_proj"] is not None or ranks["v_proj"] is None  # the small v goes dense first
        if None not in ranks.values():  # v/o hold `ratio` times the q/k parameters (to rounding)
            assert ranks["v_proj"] == ranks["o_proj"] > ranks["q_proj"] == ranks["k_proj"]
            vo = ranks["v_proj"] * (kv + 2 * hidden + hidden)
            qk = ranks["q_proj"] * (3 * hidden + kv)
            assert abs(vo / qk - 3.0) < 3.0 * 4 / ranks["q_proj"]


def test_lorap_gqa_small_v_goes_dense_alone_and_qk_get_its_savings():
    shapes = {"q_proj": (64, 64), "k_proj": (8, 64), "v_proj": (8, 64), "o_proj": (64, 64)}
    # P = 4608, k_att = floor(4608 / 400) = 11: v/o share 0.75 * 4400 / 200 -> rank 16, saving nothing on v (8 x 64).
    ranks = lorap_attention_ranks(shapes, 0.5)
    assert ranks["v_proj"] is None and ranks["o_proj"] == 16
    rest = 0.5 * 9216 - 8 * 64 - 16 * 128  # q, k share what v and o leave: 2048 / 200 -> rank 10
    assert ranks["q_proj"] == math.floor(rest / 200) == 10
    assert ranks["k_proj"] is None  # rank 10 on k (8 x 64) would cost 720 > 512: dense is cheaper
    assert lorap_params(ranks, shapes) <= 0.5 * 9216


def test_lorap_tiny_budget_gives_rank_one():
    assert lorap_attention_ranks(square(64), 0.001) == dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), 1)


def swiglu(gate, up, down, x):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def random_mlp(inter: int = 240, hidden: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(inter, hidden, generator=g, dtype=torch.float64)
    up = torch.randn(inter, hidden, generator=g, dtype=torch.float64)
    down = torch.randn(hidden, inter, generator=g, dtype=torch.float64)
    x = torch.randn(50, hidden, generator=g, dtype=torch.float64)
    inter_act = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    return gate, up, down, x, x.norm(dim=0), inter_act.norm(dim=0)


def test_channel_scores_follow_the_definition():
    gate, up, down, _, xn, zn = random_mlp(inter=7, hidden=5)
    scores = channel_scores(gate, up, down, xn, zn)
    for j in range(7):
        expected = ((gate[j].abs() * xn).norm() + (up[j].abs() * xn).norm() + (down[:, j].abs() * zn[j]).norm())
        assert torch.isclose(scores[j].double(), expected, rtol=1e-5)


def test_pruned_mlp_equals_mlp_with_channels_zeroed():
    gate, up, down, x, xn, zn = random_mlp()
    keep = channels_to_keep(channel_scores(gate, up, down, xn, zn), 0.3)
    mask = torch.zeros(len(gate), dtype=torch.float64)
    mask[keep] = 1.0
    g2, u2, d2 = prune_mlp_weights(gate, up, down, keep)
    assert g2.shape == (len(keep), 24) and u2.shape == (len(keep), 24) and d2.shape == (24, len(keep))
    zeroed = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T) * mask) @ down.T
    assert torch.allclose(swiglu(g2, u2, d2, x), zeroed, atol=1e-10)


@pytest.mark.parametrize("inter", [200, 240, 11008])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.2, 0.29, 0.5, 0.7])
def test_channels_to_keep_counts_and_protection(inter, s):
    scores = torch.rand(inter, generator=torch.Generator().manual_seed(inter))
    keep = channels_to_keep(scores, s)
    n_prune = math.floor(round(s * inter, 9))
    assert len(keep) == inter - n_prune
    assert torch.equal(keep, keep.sort().values) and len(keep.unique()) == len(keep)
    order = scores.argsort()
    protected = order[: math.floor(0.01 * inter)]
    assert set(protected.tolist()) <= set(keep.tolist())  # the least important 1% always survives
    pruned = order[math.floor(0.01 * inter): math.floor(0.01 * inter) + n_prune]
    assert not set(pruned.tolist()) & set(keep.tolist())


def test_channels_to_keep_leaves_at_least_one_channel():
    assert len(channels_to_keep(torch.rand(10), 0.99, protect_fraction=0.0)) == 1
    assert len(channels_to_keep(torch.rand(300), 0.995)) == 300 - 298


def test_huge_channel_kept_zero_channel_protected_tiny_channel_pruned():
    gate, up, down, _, xn, zn = random_mlp(inter=200)
    gate[5] *= 1e3; up[5] *= 1e3; down[:, 5] *= 1e3                   # by far the most important channel
    gate[17] = 0; up[17] = 0; down[:, 17] = 0                           # score 0: the very lowest
    gate[42] *= 1e-6; up[42] *= 1e-6; down[:, 42] *= 1e-6               # the second lowest
    gate[99] *= 1e-3; up[99] *= 1e-3; down[:, 99] *= 1e-3               # the third lowest: first one past the 1%
    scores = channel_scores(gate, up, down, xn, zn)
    assert scores.argsort()[:3].tolist() == [17, 42, 99]
    keep = set(channels_to_keep(scores, 0.25).tolist())  # 1% of 200 = 2 protected channels
    assert 5 in keep
    assert 17 in keep and 42 in keep  # LoRAP keeps the least important 1% as written, even an all-zero channel
    assert 99 not in keep
