"""Rank allocators: per-layer ranks whose factors hold a given share of the layers' dense parameters."""
from __future__ import annotations

import heapq
import math

import torch


def rank_for_budget(out_features: int, in_features: int, budget: float) -> int:
    """The largest rank r with r * (out + in) <= budget * out * in (at least 1)."""
    return max(1, int(budget * out_features * in_features // (out_features + in_features)))


def uniform_ranks(shapes: dict[str, tuple[int, int]], budget: float) -> dict[str, int]:
    """Every layer keeps the same share `budget` of its own parameters. shapes: {name: (out, in)}."""
    return {name: rank_for_budget(out, inp, budget) for name, (out, inp) in shapes.items()}


def _min_max(spectrum: torch.Tensor) -> torch.Tensor:
    """Singular values sorted descending and min-max normalised to [0, 1] (float64); a flat spectrum is all ones."""
    sigma = spectrum.detach().double().flatten().sort(descending=True).values
    span = sigma[0] - sigma[-1]
    if span <= 1e-12 * sigma[0].abs().clamp(min=1e-300):
        return torch.ones_like(sigma)
    return (sigma - sigma[-1]) / span


def welore_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                 budget: float) -> dict[str, int | None]:
    """WeLore's data-agnostic ranks (Jaiswal et al. 2024, arXiv 2407.11239); None marks a dense N-LRC.

    Per matrix the singular values are min-max normalised; one global tau keeps k_W = #{s_hat >= tau}
    directions (at least 1). A matrix is a low-rank component (LRC) iff k_W (m + n) < m n, else it stays
    dense. Our adaptation: the budget is in parameters, not ranks (sum of k (m + n) over LRCs plus m n over
    N-LRCs <= budget * sum m n), and tau comes from a bisection over the normalised values instead of the
    authors' hard-coded tau table. The leftover is then handed out one rank at a time to the layer with the
    largest next normalised singular value (a layer whose next rank would not save parameters goes dense
    instead, which costs at most one rank), so the budget is met to within one rank of one layer.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    if set(spectra) != set(shapes):
        raise ValueError("spectra and shapes must name the same layers")
    names = list(shapes)
    sizes = {name: (m * n, m + n) for name, (m, n) in shapes.items()}
    shat = {name: _min_max(spectra[name]) for name in names}
    for name, (m, n) in shapes.items():
        if len(shat[name]) != min(m, n):
            raise ValueError(f"{name}: expected {min(m, n)} singular values for shape {(m, n)}, got {len(shat[name])}")
    target = budget * sum(dense for dense, _ in sizes.values())
    # every layer at rank 1 (or dense if that saves nothing)
    minimum = sum(min(dense, edge) for dense, edge in sizes.values())
    if minimum > target:
        raise ValueError(f"budget {budget} is below the minimum: every layer at rank 1 needs {minimum} parameters, "
                         f"the budget allows {target:.0f}")
    ascending = {name: shat[name].flip(0).contiguous() for name in names}

    def keep(tau: float) -> dict[str, int]:
        return {name: max(1, len(a) - int(torch.searchsorted(a, torch.tensor([tau], dtype=a.dtype)).item()))
                for name, a in ascending.items()}

    def params(ranks: dict[str, int]) -> int:
        return sum(min(k * sizes[name][1], sizes[name][0]) for name, k in ranks.items())

    # params(tau) falls as tau grows; the candidates are the normalised values (+inf: every layer at rank 1).
    candidates = torch.cat([torch.cat(list(shat.values())).unique(), torch.tensor([float("inf")], dtype=torch.float64)])
    lo, hi = 0, len(candidates) - 1  # params(candidates[hi]) <= target holds; find the smallest such index
    while lo < hi:
        mid = (lo + hi) // 2
        if params(keep(candidates[mid].item())) <= target:
            hi = mid
        else:
            lo = mid + 1
    ranks = keep(candidates[hi].item())
    dense = {name for name, k in ranks.items() if k * sizes[name][1] >= sizes[name][0]}
    left = target - params(ranks)

    heap = [(-shat[name][k].item(), name) for name, k in ranks.items() if name not in dense]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        (mn, edge), k = sizes[name], ranks[name]
        grows = (k + 1) * edge < mn
        cost = edge if grows else mn - k * edge
        if cost > left:
            continue  # left only shrinks: this layer can never take another step
        left -= cost
        if grows:
            ranks[name] = k + 1
            heapq.heappush(heap, (-shat[name][k + 1].item(), name))
        else:
            dense.add(name)
    return {name: None if name in dense else ranks[name] for name in names}


LORAP_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def lorap_attention_ranks(shapes: dict[str, tuple[int, int]], budget: float,
                          ratio: float = 3.0) -> dict[str, int | None]:
    """LoRAP's fixed (v + o) : (q + k) = ratio : 1 split of one attention block's parameter budget; None = dense.

    P = budget * sum m n, first rounded down to a whole uniform rank k_att = floor(P / sum (m + n)) as the
    authors do (Li et al. 2024, k_att = floor(p d / 2)); v, o share ratio/(1 + ratio) of k_att * sum (m + n) and
    q, k the rest, each pair at one common rank floor(share / sum of the pair's (m + n)); for square d x d this
    is the authors' floor(k_att * 2a/(1+a)) and floor(k_att * 2/(1+a)). A layer whose rank would save nothing
    stays dense (never costing more than that rank); if v or o does, q and k share P minus what v and o cost
    (floor(p d) - d/2 for square). Every rank is at least 1, so a budget below one rank per layer is exceeded.
    """
    if set(shapes) != set(LORAP_ATTENTION):
        raise ValueError(f"shapes must be keyed by {LORAP_ATTENTION}, got {sorted(shapes)}")
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")

    def pair_ranks(pair: tuple[str, str], share: float) -> dict[str, int | None]:
        rank = max(1, math.floor(share / sum(sum(shapes[name]) for name in pair)))
        return {name: rank if rank * sum(shapes[name]) < math.prod(shapes[name]) else None for name in pair}

    def cost(ranks: dict[str, int | None]) -> int:
        return sum(math.prod(shapes[name]) if r is None else r * sum(shapes[name]) for name, r in ranks.items())

    total = budget * sum(m * n for m, n in shapes.values())
    edges = sum(m + n for m, n in shapes.values())
    shared = math.floor(total / edges) * edges  # the authors round the budget down to a whole uniform rank k_att
    ranks = pair_ranks(("v_proj", "o_proj"), shared * ratio / (1 + ratio))
    dense_vo = None in ranks.values()
    ranks.update(pair_ranks(("q_proj", "k_proj"), total - cost(ranks) if dense_vo else shared / (1 + ratio)))
    return {name: ranks[name] for name in LORAP_ATTENTION}


def choose_forms(bits: list[list[int]], errors: list[list[float]], budget: int,
                 units: int = 8192) -> tuple[list[int], float]:
    """One form per layer, total stored bits <= `budget`, least summed error: the multiple-choice knapsack.

    bits[i][j], errors[i][j]: layer i's form j. Solved exactly by dynamic programming over the budget cut into
    `units` equal steps, each form's bits rounded *up* to whole steps, so that any choice the table allows meets
    the budget in exact bits; the rounding can only exclude choices within one step per layer of the budget.
    Returns (the chosen form of each layer, the summed error); ValueError when even the smallest forms exceed
    the budget.
    """
    if len(bits) != len(errors) or any(len(b) != len(e) or not b for b, e in zip(bits, errors)):
        raise ValueError("every layer needs a non-empty menu, with one error per form")
    if sum(min(b) for b in bits) > budget:
        raise ValueError(f"the smallest forms take {sum(min(b) for b in bits)} bits, over the budget of {budget}")
    step = budget / units

    def steps(form_bits: int) -> int:  # rounded up: a choice within `units` steps is within the budget
        return math.ceil(form_bits / step - 1e-9)

    best = torch.zeros(units + 1, dtype=torch.float64)  # best[u]: least error of the layers so far in <= u steps
    choices = []
    for layer_bits, layer_errors in zip(bits, errors):
        candidates = torch.full((len(layer_bits), units + 1), math.inf, dtype=torch.float64)
        for j, (form_bits, error) in enumerate(zip(layer_bits, layer_errors)):
            cost = steps(form_bits)
            if cost <= units:
                candidates[j, cost:] = best[:units + 1 - cost] + error
        best, choice = candidates.min(0)  # on a tie the first form, as torch returns the first least index
        choices.append(choice)
    if not math.isfinite(best[units].item()):
        raise ValueError(f"no choice of forms fits {budget} bits at a resolution of {units} steps; raise `units`")
    chosen, left = [], units
    for layer_bits, choice in zip(reversed(bits), reversed(choices)):
        j = int(choice[left])
        chosen.append(j)
        left -= steps(layer_bits[j])
    chosen.reverse()
    return chosen, sum(errors[i][j] for i, j in enumerate(chosen))
