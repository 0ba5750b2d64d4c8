"""Linear algebra shared by the factorizations: damped Cholesky of a Gram matrix, whitened truncated SVD, and the
precision each Gram is kept in.

An 8B model's down_proj reads 14336 channels: its float64 Gram, and every (n, n) matrix derived from it, is 1.5 GiB.
The decompositions therefore work in place (`cholesky_`, `triangular_inverse_`, `eigh_`): on the CPU through LAPACK
(scipy), which overwrites its input, where torch.linalg would allocate the result beside it and, for eigh, a 2 n^2
workspace too. Elsewhere (CUDA) they fall back to torch and copy the result back. LAPACK runs with torch's
thread count: scipy's OpenBLAS otherwise starts a thread per core, and beside any other busy process (torchrun's
other ranks) its spinning threads make a factorization 10-100x slower.

A 70B model's down_proj reads 28672 channels (6.1 GiB in float64), a 405B's 53248 (21 GiB): where a capture step's
Grams would not fit, `gram_dtypes` keeps the widest in float32, and every function here then works in the Gram's
own precision (float32 LAPACK) rather than in a float64 copy of it.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibration.capture import symmetrize_
from compress import distributed


@dataclass(frozen=True)
class LowRank:
    """W ~= up @ down with up (out, rank) and down (rank, in); directions: how many eigen-directions of the input Gram
    the factors could use (EoRA: those above float64 noise), None where not counted."""

    up: torch.Tensor
    down: torch.Tensor
    directions: int | None = None

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def weight(self) -> torch.Tensor:
        return self.up @ self.down


GRAM_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def memory_bytes(device: torch.device | str) -> int:
    """The memory one rank plans its Grams with: the device's total (a GPU's; the machine's, or its cgroup's limit
    when lower, shared by torchrun's LOCAL_WORLD_SIZE ranks on it). The total, not what is free now, so that one
    machine always chooses alike and writes the same files."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def gram_dtypes(widths: dict[str, int], per_gram: int, working: int, memory: int) -> dict[str, torch.dtype]:
    """The dtype of each Gram of one capture step ({group: input width}): float64 unless the step would need more
    than half of `memory`, then float32 for the widest, one at a time, until it fits (or all are float32).

    The step needs its Grams, all alive until solved (`per_gram` matrices each: 2 with a cross term), and `working`
    (n, n) copies of the widest in its dtype (GPTQ's inverse Hessian factor, EoRA's eigenvectors; 2 with a
    factorization). Float32 halves a matrix: a 70B down_proj's Gram (28672 wide) is 6.1 GiB in float64."""
    dtypes = {group: torch.float64 for group in widths}

    def needed() -> int:
        grams = sum(per_gram * width**2 * dtypes[group].itemsize for group, width in widths.items())
        widest = max(widths, key=lambda group: widths[group] ** 2 * dtypes[group].itemsize)
        return grams + working * widths[widest] ** 2 * dtypes[widest].itemsize

    for group in sorted(widths, key=lambda group: (-widths[group], group)):
        if needed() <= memory // 2:
            break
        dtypes[group] = torch.float32
    return dtypes


def nonfinite_count(tensor: torch.Tensor, rows: int = 1024) -> int:
    """How many entries are NaN or Inf, a block of rows at a time: torch.isfinite on a whole (n, n) float64 matrix
    holds temporaries larger than the matrix."""
    flat = tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 1 else tensor[None]
    # a finite sum (one pass, no temporary) means every entry is finite; only a block whose sum is not (a NaN or
    # Inf in it, or an overflow of the sum) is counted entry by entry
    return sum((~torch.isfinite(block)).sum().item() for block in flat.split(rows)
               if not torch.isfinite(block.sum()))


PRECISIONS = (torch.float32, torch.float64)  # what a Gram, and the decompositions of it, are kept in


def precision(matrix: torch.Tensor) -> torch.dtype:
    """The precision that math on `matrix` runs in: its own when float32 or float64, else float64."""
    return matrix.dtype if matrix.dtype in PRECISIONS else torch.float64


def _lapack(matrix: torch.Tensor) -> np.ndarray | None:
    """A Fortran-ordered numpy view of a contiguous float32/float64 CPU tensor, or None where LAPACK cannot work in
    place.

    The view is the tensor's transpose: for a symmetric matrix the same matrix, and a factor that LAPACK writes
    into the view's lower (upper) triangle is the transpose of the one the tensor then holds in its upper (lower)."""
    if matrix.device.type != "cpu" or matrix.dtype not in PRECISIONS or not matrix.is_contiguous():
        return None
    return matrix.detach().numpy().T


# scipy's OpenBLAS (0.3.30) crashes (SIGSEGV) in its threaded Cholesky of large matrices, measured here with 2
# threads: dpotrf at n = 16000 and 16384 (a 405B q_proj's float64 Gram, 2 GiB), spotrf at 28672 (a 70B down_proj);
# dpotrf passed at 12288 and 14336 (an 8B down_proj, 1.53 GiB). One thread passes at every size. Larger matrices
# are factored on one thread.
THREADED_LAPACK_BYTES = 7 << 28  # 1.75 GiB


@contextmanager
def lapack_threads(nbytes: int = 0):
    """Within the context, scipy's BLAS/LAPACK runs on torch's thread count (threadpoolctl); on one thread for a
    matrix of more than THREADED_LAPACK_BYTES."""
    threads = 1 if nbytes > THREADED_LAPACK_BYTES else torch.get_num_threads()
    with _threadpools().limit(limits=threads, user_api="blas"):
        yield


@functools.cache
def _threadpools():
    """threadpoolctl's view of the loaded BLAS libraries (scipy's among them), found once: finding them takes
    milliseconds, as long as a small layer's factorization."""
    import scipy.linalg  # noqa: F401 - loads scipy's BLAS, so that the controller sees it
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _lapack_call(name: str, view: np.ndarray, *args, **kwargs):
    """LAPACK's `name` (potrf, potri) for the view's precision (s or d), on torch's thread count."""
    import scipy.linalg  # here, not at the top: the CUDA path needs no scipy (the GPU machines may lack it)

    (function,) = scipy.linalg.lapack.get_lapack_funcs((name,), (view,))
    with lapack_threads(view.nbytes):
        return function(view, *args, **kwargs)


def cholesky_(matrix: torch.Tensor, upper: bool = False) -> bool:
    """Replace a symmetric positive definite float32/float64 matrix by its Cholesky factor, in place: lower L with
    L L^T = matrix, or upper U with U^T U = matrix; only that triangle is read. False (the matrix then holds
    garbage) when it is not positive definite."""
    view = _lapack(matrix)
    if view is None:
        factor, info = torch.linalg.cholesky_ex(matrix, upper=upper)
        matrix.copy_(factor)
        return info.item() == 0
    _, info = _lapack_call("potrf", view, lower=upper, clean=1, overwrite_a=1)
    return info == 0


def triangular_inverse_(factor: torch.Tensor, upper: bool = False) -> None:
    """Replace a triangular matrix (lower, or upper) by its inverse, in place; the other triangle is left as it is."""
    view = _lapack(factor)
    if view is None:
        eye = torch.eye(len(factor), dtype=factor.dtype, device=factor.device)
        triangle = factor.triu() if upper else factor.tril()
        factor.copy_(torch.linalg.solve_triangular(triangle, eye, upper=upper))
        return
    _, info = _lapack_call("trtri", view, lower=upper, overwrite_c=1)
    if info != 0:
        raise torch.linalg.LinAlgError("triangular_inverse_: the matrix is singular")


CHOLESKY_BLOCK = 512  # the rows of one panel of `shared_cholesky_`


def cholesky_rows(n: int, world: distributed.World, block: int = CHOLESKY_BLOCK) -> list[range]:
    """The rows of an (n, n) matrix that rank `world.rank` holds for `shared_cholesky_`: row block k (of `block`
    rows) belongs to rank k mod size."""
    starts = range(world.rank * block, n, world.size * block)
    return [range(start, min(start + block, n)) for start in starts]


def pooled_solve(team: distributed.World, width: int, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether the ranks of `team`, solving a (width, width) matrix together, do better to lend one of them their
    threads (threaded LAPACK while they wait) than to split the factorization by rows (`shared_cholesky_`,
    `shared_upper_inverse_`): on the CPU, every rank on one machine, and a matrix LAPACK factors threaded. Two
    threads of one process split a Cholesky with no loss; two processes pay for the panels' transfers and run the
    blocked products slower than LAPACK does."""
    nbytes = width * width * torch.finfo(dtype).bits // 8
    return (team.size > 1 and torch.device(device).type == "cpu" and nbytes <= THREADED_LAPACK_BYTES
            and distributed.one_host(team))


def shared_cholesky_(matrix: torch.Tensor, world: distributed.World, block: int = CHOLESKY_BLOCK) -> bool:
    """Replace a symmetric positive definite matrix A by its upper Cholesky factor R (R^T R = A, zeros below the
    diagonal), in place, the work shared by the ranks of `world`, each of which holds A's rows `cholesky_rows` (the
    others are not read). Right-looking by row blocks: block k's owner factors its diagonal block, solves the block's
    row of R and broadcasts it; every rank then updates the later row blocks it owns by that row (the bulk of the
    flops). With look-ahead: the owner of block k + 1 updates it first, factors it and sends it while every rank
    updates its other blocks, so that no rank waits on a panel. Every rank ends with the whole R. False, on every
    rank alike, when A is not positive definite."""
    n = len(matrix)
    starts = list(range(0, n, block))

    def post(index: int):
        """Panel `index`, factored by its owner (from rows updated by every earlier panel), on its way to all."""
        k0, owner = starts[index], index % world.size
        k1 = min(k0 + block, n)
        if world.rank == owner:
            panel = matrix[k0:k1, k0:].clone()
            diagonal, info = torch.linalg.cholesky_ex(panel[:, :k1 - k0], upper=True)
            if info.item():  # not positive definite: the NaNs tell every rank
                panel.fill_(float("nan"))
            else:
                if k1 < n:  # R_kk^T R_k,rest = A_k,rest
                    panel[:, k1 - k0:] = torch.linalg.solve_triangular(diagonal.T, panel[:, k1 - k0:], upper=False)
                panel[:, :k1 - k0] = diagonal
        else:
            panel = torch.empty(k1 - k0, n - k0, dtype=matrix.dtype, device=matrix.device)
        return panel, distributed.broadcast_async(panel, owner, world)

    def update(panel: torch.Tensor, k0: int, index: int) -> None:
        """Row block `index` (a later one, this rank's) less its share of the product of panel k0's rows."""
        i0 = starts[index]
        i1 = min(i0 + block, n)
        matrix[i0:i1, i0:].addmm_(panel[:, i0 - k0:i1 - k0].T, panel[:, i0 - k0:], alpha=-1)

    panel, arriving = post(0)
    for index, k0 in enumerate(starts):
        distributed.wait(arriving)
        if not torch.isfinite(panel[:, 0]).all():
            return False
        matrix[k0:k0 + len(panel), :k0] = 0
        matrix[k0:k0 + len(panel), k0:] = panel
        later = [i for i in range(index + 1, len(starts)) if i % world.size == world.rank]
        if later and later[0] == index + 1:  # look-ahead: the next panel is this rank's
            update(panel, k0, later.pop(0))
        following = post(index + 1) if index + 1 < len(starts) else (None, None)
        for i in later:
            update(panel, k0, i)
        panel, arriving = following
    return True


def transpose_(matrix: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Transpose a contiguous square matrix in place, a pair of blocks at a time: no copy of the matrix is held."""
    n = len(matrix)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        matrix[i0:i1, i0:i1] = matrix[i0:i1, i0:i1].T.clone()
        for j0 in range(i1, n, block):
            j1 = min(j0 + block, n)
            upper = matrix[i0:i1, j0:j1].clone()
            matrix[i0:i1, j0:j1] = matrix[j0:j1, i0:i1].T
            matrix[j0:j1, i0:i1] = upper.T
    return matrix


def shared_upper_inverse_(factor: torch.Tensor, world: distributed.World, block: int = 512) -> torch.Tensor:
    """Replace an upper triangular matrix V (zeros below the diagonal) by its inverse, in place, the work shared by
    the ranks of `world`, each of which holds the same V. Row block [c, e) of Y = V^-1 solves Y[c:e, c:] V[c:, c:] =
    I[c:e, c:] and reads only the rows of V from c on: each rank works its rows (equal flops) top to bottom in place,
    then broadcasts them. Blocked, so that the work is matrix products on views of V, not copies of it."""
    bounds = distributed.row_bounds(len(factor), world, cubic=True)
    for start in range(bounds[world.rank], bounds[world.rank + 1], block):
        stop = min(start + block, bounds[world.rank + 1])
        tail = factor[:, start:]
        rows = torch.zeros(stop - start, tail.shape[1], dtype=factor.dtype, device=factor.device)
        rows[:, :stop - start] = torch.eye(stop - start, dtype=factor.dtype, device=factor.device)
        for k0 in range(0, tail.shape[1], block):  # right-looking: columns k0:k1 of Y, then their share pushed on
            k1 = min(k0 + block, tail.shape[1])
            diagonal = tail[start + k0:start + k1, k0:k1].contiguous()
            rows[:, k0:k1] = torch.linalg.solve_triangular(diagonal, rows[:, k0:k1], upper=True, left=False)
            rows[:, k1:].addmm_(rows[:, k0:k1], tail[start + k0:start + k1, k1:], alpha=-1)
        tail[start:stop] = rows
    distributed.share_rows([factor], bounds, world)
    return factor


def reverse_(matrix: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Reverse the order of both rows and columns of a contiguous matrix in place (J M J, J the reversal): the
    flattened entries in reverse, swapped `chunk` at a time so that no copy of the matrix is held."""
    flat = matrix.view(-1)
    size = flat.numel()
    for start in range(0, size // 2, chunk):
        end = min(start + chunk, size // 2)
        head = flat[start:end].flip(0)
        flat[start:end] = flat[size - end:size - start].flip(0)
        flat[size - end:size - start] = head
    return matrix


def spill_needed(matrix: torch.Tensor, memory: int) -> bool:
    """Whether a CPU (n, n) matrix and one working copy of it would take more than half of `memory` (the rule of
    `gram_dtypes`): then the working copy is made in the matrix's own memory while it waits on disk (Spill)."""
    return matrix.device.type == "cpu" and 2 * matrix.numel() * matrix.element_size() > memory // 2


class Spill:
    """A contiguous CPU matrix lent out: its values wait in a temporary file while its memory holds something else
    (GPTQ's inverse Hessian factor of a 405B down_proj, whose float32 Gram is 10.6 GiB), and come back in place.

    The file is read with pread, not mapped: mapped pages would count in the process's resident memory."""

    CHUNK = 1 << 26  # bytes per write or read

    def __init__(self, matrix: torch.Tensor, directory: str | Path | None = None):
        import tempfile

        if matrix.device.type != "cpu" or not matrix.is_contiguous():
            raise ValueError("Spill: the matrix must be a contiguous CPU tensor")
        self.matrix = matrix
        self.file = tempfile.TemporaryFile(dir=directory)
        self.bytes = memoryview(matrix.detach().view(-1).view(torch.uint8).numpy())
        for start in range(0, len(self.bytes), self.CHUNK):
            self.file.write(self.bytes[start:start + self.CHUNK])
        self.file.flush()

    def gathered(self, order: torch.Tensor, rows: list[range] | None = None, chunk: int = 256) -> torch.Tensor:
        """The matrix's values as matrix[order][:, order], written into its own memory, `chunk` rows at a time; with
        `rows`, only those rows (the others hold what they held)."""
        n = len(self.matrix)
        row_bytes = n * self.matrix.element_size()
        buffer = torch.empty(chunk, n, dtype=self.matrix.dtype)
        view = memoryview(buffer.view(-1).view(torch.uint8).numpy())
        for part in [range(n)] if rows is None else rows:
            for start in range(part.start, part.stop, chunk):
                chosen = order[start:min(start + chunk, part.stop)].tolist()
                for slot, row in enumerate(chosen):
                    self._read(view[slot * row_bytes:(slot + 1) * row_bytes], row * row_bytes)
                self.matrix[start:start + len(chosen)] = buffer[:len(chosen), order]
        return self.matrix

    def diagonal(self) -> torch.Tensor:
        """The matrix's diagonal, read from the file."""
        n, size = len(self.matrix), self.matrix.element_size()
        diagonal = torch.empty(n, dtype=self.matrix.dtype)
        view = memoryview(diagonal.view(torch.uint8).numpy())
        for i in range(n):
            self._read(view[i * size:(i + 1) * size], (i * n + i) * size)
        return diagonal

    def restore(self) -> torch.Tensor:
        """The matrix's own values back in its memory; the file is closed."""
        for start in range(0, len(self.bytes), self.CHUNK):
            self._read(self.bytes[start:start + self.CHUNK], start)
        self.file.close()
        return self.matrix

    def _read(self, into: memoryview, offset: int) -> None:
        done = 0
        while done < len(into):
            count = os.preadv(self.file.fileno(), [into[done:]], offset + done)
            if count <= 0:
                raise OSError("Spill: the temporary file ended early")
            done += count


def eigh_(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of a symmetric float32/float64 matrix with one (n, n) allocation, the eigenvectors: (eigenvalues
    ascending, Q).

    On the CPU, LAPACK's syevr (O(n) workspace) reads and destroys the upper triangle and diagonal of `matrix`,
    which are then restored from the intact lower triangle and a saved diagonal: exactly, if the matrix was
    exactly symmetric (see `symmetrize_`); otherwise it works on a copy. torch.linalg.eigh would hold the
    eigenvectors, a copy and syevd's 2 n^2 workspace beside the matrix (6 GiB for an 8B down_proj Gram).
    """
    view = _lapack(matrix)
    if view is None:
        return torch.linalg.eigh(matrix)
    if nonfinite_count(matrix):
        raise ValueError("eigh_: the matrix has non-finite entries")
    symmetric = all(torch.equal(matrix[start:start + 1024, :], matrix[:, start:start + 1024].T)
                    for start in range(0, len(matrix), 1024))
    if not symmetric:
        return eigh_(symmetrize_(matrix.clone()))
    import scipy.linalg

    diagonal = matrix.diagonal().clone()
    with lapack_threads(view.nbytes):
        eigenvalues, vectors = scipy.linalg.eigh(view, driver="evr", lower=True, overwrite_a=True, check_finite=False)
    symmetrize_(matrix).diagonal().copy_(diagonal)
    return torch.from_numpy(eigenvalues), torch.from_numpy(vectors)


@contextmanager
def equilibrated_(gram: torch.Tensor):
    """Within the context a float32 Gram G is D^-1 G D^-1, in place, with D (n,) the powers of two nearest to the
    square roots of its diagonal; yields D, and puts G back bit for bit on exit (scaling by powers of two is exact).

    Channels whose scales span decades leave G's small eigen-directions below float32's rounding; scaled, every
    channel has unit energy and they survive. A problem min ||(T - M) X|| becomes min ||(T D - M') D^-1 X|| with
    M = M' D^-1: callers solve it for T D against the scaled Gram and divide their `down` by D. A float64 Gram is
    left as it is (D = 1), so that float64 results do not move."""
    scale = torch.ones(len(gram), dtype=gram.dtype, device=gram.device)
    if gram.dtype == torch.float32:
        diagonal = gram.diagonal()
        scale = torch.where(diagonal > 0, torch.exp2(torch.round(torch.log2(diagonal.clamp(min=1e-30)) / 2)), 1)
        gram.div_(scale[:, None]).div_(scale[None, :])
    try:
        yield scale
    finally:
        if gram.dtype == torch.float32:
            gram.mul_(scale[:, None]).mul_(scale[None, :])


def damped_cholesky(gram: torch.Tensor, max_tries: int = 10, ridge: float = 0.0) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor L of gram + damp*I (in the Gram's precision), L @ L.T = gram + damp*I, and the damp used.

    Tries `ridge` times the mean diagonal first (0: no damping), then 1e-8, 1e-7, ... times it (each at least the
    ridge); dead input channels
    (zero diagonal) get the mean diagonal so that they cannot make the factor singular. Besides the Gram, one
    (n, n) matrix is alive: the working copy that becomes the factor.
    """
    gram = gram.to(precision(gram))
    diag = gram.diagonal()
    mean_diag = diag.mean().clamp(min=1e-12).item()
    undamped = torch.where(diag <= 0, mean_diag, diag)
    for attempt in range(max_tries):
        damp = mean_diag * max(ridge, 0.0 if attempt == 0 else 10.0 ** (attempt - 9))
        factor = gram.clone()
        factor.diagonal().copy_(undamped + damp)  # on the diagonal in place: no (n, n) identity or sum beside
        if cholesky_(factor):
            return factor, damp
        del factor
    raise torch.linalg.LinAlgError(f"Gram matrix is not positive definite even with damping {damp:.3g}")


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`rank` singular triplets (U_r, S_r, Vh_r) of a float64 matrix."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


def balanced_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of a float64 (m, n) matrix split evenly: (U_r S_r^(1/2) (m, r), S_r^(1/2) V_r^T (r, n))."""
    U, S = top_left_singular(matrix, rank)
    return balanced_factors(U, S, U.T @ matrix)


def top_left_singular(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`rank` left singular vectors and values (U_r, S_r) of a float64 (m, n) matrix, without the full SVD,
    which holds three more (m, n) arrays (1.5 GiB for an 8B MLP projection) and computes what callers drop.

    Wide (m <= n): eigh(matrix matrix^T), (m, m). Tall: R of a QR, SVD(R) = U_R S V^T, and U_r = matrix V_r / S_r.
    """
    if matrix.shape[0] <= matrix.shape[1]:
        eigenvalues, vectors = torch.linalg.eigh(matrix @ matrix.T)
        return vectors.flip(1)[:, :rank], eigenvalues.flip(0)[:rank].clamp(min=0).sqrt()
    _, S, Vh = torch.linalg.svd(torch.linalg.qr(matrix, mode="r").R)
    S, Vh = S[:rank], Vh[:rank]
    return (matrix @ Vh.T) / torch.where(S > 0, S, 1), S


def balanced_factors(U: torch.Tensor, S: torch.Tensor, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) = (U_r S_r^(1/2), S_r^(-1/2) projected) for projected = U_r^T T: the rank-r approximation U_r U_r^T T
    split evenly (S_r V_r^T = U_r^T T when U, S come from SVD(T): then this is `balanced_svd(T)`).

    Singular values at the rounding level of the eigh (below S_0 sqrt(m eps)) are zero: their directions get zero
    factors rather than a division by almost nothing.
    """
    kept = S > S[:1] * (len(U) * torch.finfo(U.dtype).eps) ** 0.5
    sqrt_s = torch.where(kept, S, 1).sqrt()
    return U * torch.where(kept, sqrt_s, 0), projected * torch.where(kept, 1 / sqrt_s, 0)[:, None]


def whitened_lowrank(target: torch.Tensor, whitened: torch.Tensor, rank: int) -> LowRank:
    """argmin over rank-r M of ||(target - M) R||_F, given whitened = target R for an invertible root R (R R^T = gram).

    SVD(target R) = U S V^T; up = U_r S_r^(1/2), down = S_r^(1/2) V_r^T R^(-1) = S_r^(-1/2) U_r^T target (since
    S_r V_r^T = U_r^T target R): no triangular solve, so callers free R before this. With the Cholesky factor of
    the input Gram this minimises the layer output error ||(target - M) X||_F (SVD-LLM).
    """
    U, S = top_left_singular(whitened, rank)
    up, down = balanced_factors(U, S, U.T @ target.to(U.dtype))
    return LowRank(up=up.to(target.dtype), down=down.to(target.dtype))


def eigen_root(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(root = Q Lambda^(1/2) (n, n), inverse_lambda (n,)) in the Gram's precision, from eigh(gram) = Q Lambda Q^T.

    root @ root.T = gram, and (inverse_lambda[:, None] * root.T) = Lambda^(-1/2) Q^T is root's pseudo-inverse:
    callers apply it as that product, so that only one (n, n) matrix besides the Gram is ever held (see `eigh_`).
    A truncated pseudo-inverse: eigenvalues <= lambda_max * n * eps (the accuracy of an eigh in the Gram's precision:
    float64's, or float32's for a Gram kept in float32), negative ones included, count as zero, and both their square
    root and inverse are set to 0. (GPTQModel's EoRA cuts a float64 eigh at float32's eps, which drops real
    directions of a wide, ill-conditioned layer.)
    """
    if nonfinite_count(gram):
        raise ValueError("eigen_root: the Gram matrix has non-finite entries "
                         "(NaN or inf in the calibration statistics)")
    eigenvalues, root = eigh_(gram.to(precision(gram)))
    if not torch.isfinite(eigenvalues).all():
        raise ValueError("eigh of the Gram matrix returned non-finite eigenvalues")
    threshold = eigenvalues.max().clamp(min=0) * len(gram) * torch.finfo(root.dtype).eps
    kept = eigenvalues > threshold
    sqrt_lambda, inverse_lambda = torch.zeros_like(eigenvalues), torch.zeros_like(eigenvalues)
    sqrt_lambda[kept] = eigenvalues[kept].sqrt()
    inverse_lambda[kept] = 1 / eigenvalues[kept]
    return root.mul_(sqrt_lambda), inverse_lambda


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor, rows: int = 512,
                 max_rows: int = 1024) -> float:
    """Relative layer output error ||(W - W') X||_F / ||W X||_F computed from the Gram X X^T.

    tr(E G E^T) is summed a block of rows at a time, so that no (out, in) temporaries are held; the products are in
    the weights' precision (float32 weights: twice as fast as float64, within about 1e-5 of it), summed in float64.
    A layer of more than `max_rows` output rows is measured on that many evenly spaced rows (both norms on the same
    rows, a sample whose relative error is about 1 / sqrt(max_rows) of the rows' spread): the exact figure of an 8B
    down_proj costs two (4096, 14336) x (14336, 14336) products, as much as GPTQ's whole solve of it, and a 405B
    down_proj's 1.9e14 flops, 39 minutes on this machine's two cores."""
    if len(weight) > max_rows:
        index = torch.linspace(0, len(weight) - 1, max_rows, device=weight.device).round().long()
        weight, approx = weight[index], approx[index]
    team = distributed.team()  # ranks solving together: each sums its share of the rows
    bounds = distributed.row_bounds(len(weight), team)
    weight, approx = (t[bounds[team.rank]:bounds[team.rank + 1]] for t in (weight, approx))
    dtype = torch.promote_types(torch.promote_types(weight.dtype, approx.dtype), torch.float32)
    gram = gram.to(dtype)
    num = den = 0.0
    for rows_w, rows_a in zip(weight.split(rows), approx.split(rows)):
        rows_w = rows_w.to(dtype)
        error = rows_w - rows_a.to(dtype)
        num += ((error @ gram) * error).sum(dtype=torch.float64).item()
        den += ((rows_w @ gram) * rows_w).sum(dtype=torch.float64).item()
    num, den = distributed.total([num, den], team)
    return (max(num, 0.0) / max(den, 1e-30)) ** 0.5
