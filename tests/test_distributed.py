"""torchrun-style runs (gloo, 2 ranks, each a process of its own): the same answer as one process up to the order of
float sums, the same files run to run, and a rank that dies mid-block leaves no output and the run resumes."""
import hashlib
import json
import multiprocessing
import os
import socket
import sys

import torch

from compress.cli import main
from compress.distributed import World, owners, row_bounds, together_items
from compress.formats.native import load_compressed
from evaluations.perplexity import perplexity

FLAGS = ["--wbits", "4", "--group-size", "32", "--quantize", "gptq", "--nsamples", "4", "--seqlen", "32",
         "--no-eval-ppl"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_main(rank: int, size: int, port: int, argv: list[str], die_in_block: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if die_in_block is not None and rank == size - 1:  # the last rank dies while solving a layer of that block
        import compress.pipeline as pipeline

        solve = pipeline.compress_linear

        def dying(name, *args, **kwargs):
            if name.startswith(f"model.layers.{die_in_block}."):
                os._exit(3)
            return solve(name, *args, **kwargs)

        pipeline.compress_linear = dying
    sys.exit(main(argv))


def run_ranks(argv: list[str], size: int = 2, die_in_block: int | None = None) -> list[int]:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=rank_main, args=(rank, size, port, argv, die_in_block))
                 for rank in range(size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    return [process.exitcode for process in processes]


def digests(directory) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.glob("*.safetensors"))}


def test_owners_balance_the_solves():
    assert owners([5, 1, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1, 1]
    assert owners([3, 3, 2, 2], 2) == [0, 1, 0, 1]
    assert owners([1.0] * 3, 1) == [0, 0, 0]


def test_a_layer_larger_than_an_equal_share_is_solved_together_and_triangle_rows_split_by_equal_flops():
    assert together_items([3.8, 0.3, 0.3, 0.14, 0.14, 0.09, 0.09], 2) == [0]  # 8B down_proj beside its block
    assert together_items([1.0], 2) == [0] and together_items([1.0, 1.0], 3) == [0, 1]
    assert together_items([3, 3, 2, 2], 2) == [] and together_items([5.0], 1) == []
    bounds = row_bounds(1000, World(0, 3), cubic=True)
    flops = [sum((1000 - row) ** 2 for row in range(start, stop)) for start, stop in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == 1000 and max(flops) / min(flops) < 1.01
    assert row_bounds(37, World(0, 2)) == [0, 18, 37]


def test_a_solve_on_pooled_threads_takes_every_rank_s_threads_and_gives_them_back():
    from compress.distributed import pooled_threads
    from compress.linalg import THREADED_LAPACK_BYTES, pooled_solve

    threads, cores = torch.get_num_threads(), len(os.sched_getaffinity(0))
    torch.set_num_threads(1)
    try:
        with pooled_threads(World(0, 4)):
            assert torch.get_num_threads() == min(4, cores)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    width = int((THREADED_LAPACK_BYTES // 8) ** 0.5)  # the widest float64 matrix LAPACK factors threaded
    assert not pooled_solve(World(), 100, torch.float64, "cpu")  # one process: nothing to pool
    assert not pooled_solve(World(0, 2), width + 1, torch.float64, "cpu")  # too wide: split by rows instead
    assert not pooled_solve(World(0, 2), width, torch.float64, "cuda")  # a GPU's threads are not lent


def test_two_ranks_agree_with_one_process_and_repeat_exactly(tiny_model_dir, tmp_path):
    argv = ["--model", str(tiny_model_dir), *FLAGS]
    assert run_ranks(argv + ["--out", str(tmp_path / "a")]) == [0, 0]
    assert run_ranks(argv + ["--out", str(tmp_path / "b")]) == [0, 0]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    assert digests(tmp_path / "a") == digests(tmp_path / "b")  # the same world size: the same files
    assert not list(tmp_path.glob(".*partial*"))  # every rank's work directory is gone
    ids = torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(1)).flatten()
    two, one = (perplexity(load_compressed(tmp_path / name), ids, 32, progress=False) for name in ("a", "one"))
    assert abs(two / one - 1) < 1e-3  # the Grams summed in another order: within 0.1%


def test_a_rank_dying_mid_block_leaves_no_output_and_the_run_resumes(tiny_model_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_model_dir), *FLAGS]
    assert run_ranks(argv + ["--out", str(tmp_path / "whole")]) == [0, 0]
    codes = run_ranks(argv + ["--out", str(tmp_path / "out")], die_in_block=1)
    assert codes[1] == 3 and codes[0] != 0
    assert not (tmp_path / "out").exists()
    assert (tmp_path / ".out.partial" / "block-00000.json").is_file()  # block 0 was finished before the death
    assert main(argv + ["--out", str(tmp_path / "out"), "--resume"]) == 2  # one process cannot resume two ranks' run
    assert "world_size" in capsys.readouterr().err
    assert run_ranks(argv + ["--out", str(tmp_path / "out"), "--resume"]) == [0, 0]
    assert digests(tmp_path / "out") == digests(tmp_path / "whole")


def spawn_ranks(target, out: str, size: int = 2) -> list[int]:
    """target(rank, port, out) in `size` processes of their own; their exit codes."""
    context, port = multiprocessing.get_context("spawn"), free_port()
    processes = [context.Process(target=target, args=(rank, port, out)) for rank in range(size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    return [process.exitcode for process in processes]


def gradient_rank(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2 holds windows [0, 3) or [3, 5) of five, and averages its gradient with the other's."""
    import torch.distributed as dist

    from compress import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    world = distributed.world()
    weight = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    mine = inputs[:3] if rank == 0 else inputs[3:]
    (mine @ weight.T).tanh().square().sum(1).mean().backward()  # a mean over this rank's windows
    distributed.average_gradients([weight], len(mine), world)
    torch.save(weight.grad, f"{out}/grad{rank}.pt")
    dist.destroy_process_group()


def test_averaged_gradients_over_unequal_shares_equal_the_gradient_of_the_mean_over_all(tmp_path):
    assert spawn_ranks(gradient_rank, str(tmp_path)) == [0, 0]
    weight = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    (inputs @ weight.T).tanh().square().sum(1).mean().backward()
    for rank in range(2):
        assert torch.allclose(torch.load(tmp_path / f"grad{rank}.pt"), weight.grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(torch.load(tmp_path / "grad0.pt"), torch.load(tmp_path / "grad1.pt"))


def logits(directory, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_compressed(directory)(ids).logits


def test_two_ranks_learn_signround_alike_and_as_one_process_does(tiny_model_dir, tmp_path):
    # 8 windows and SignRound's batch of 8: every step sees every window, on 2 ranks (4 each) as in one process
    argv = ["--model", str(tiny_model_dir), "--wbits", "2", "--group-size", "32", "--nsamples", "8", "--seqlen", "32",
            "--quantize", "signround", "--iterations", "20", "--no-eval-ppl"]
    assert run_ranks(argv + ["--out", str(tmp_path / "a")]) == [0, 0]
    assert run_ranks(argv + ["--out", str(tmp_path / "b")]) == [0, 0]
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    rtn = ["--model", str(tiny_model_dir), "--wbits", "2", "--group-size", "32", "--nsamples", "8", "--seqlen", "32",
           "--no-eval-ppl"]
    assert main(rtn + ["--out", str(tmp_path / "rtn")]) == 0
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
    two, one, rounded = (logits(tmp_path / name, ids) for name in ("a", "one", "rtn"))
    learned = (one - rounded).norm()
    assert learned > 0  # SignRound moved away from round-to-nearest ...
    assert (two - one).norm() < 0.01 * learned  # ... and two ranks moved where one process did


def test_two_ranks_prune_lorap_as_one_process_does(tiny_model_dir, tmp_path):
    argv = ["--model", str(tiny_model_dir), "--rank-budget", "0.6", "--factorize", "lorap", "--nsamples", "4",
            "--seqlen", "32", "--no-eval-ppl"]
    assert run_ranks(argv + ["--out", str(tmp_path / "two")]) == [0, 0]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("two", "one"))
    kept = [{name: entry.get("channels_kept") for name, entry in report["layers"].items()} for report in (two, one)]
    assert kept[0] == kept[1] and any(kept[0].values())
    ids = torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(1)).flatten()
    two, one = (perplexity(load_compressed(tmp_path / name), ids, 32, progress=False) for name in ("two", "one"))
    assert abs(two / one - 1) < 1e-3


def together_rank(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2 solves one layer together with the other: an upper triangular inverse, GPTQ (act-order and
    static groups) and the output error, each split by rows."""
    import torch.distributed as dist

    from compress import distributed, linalg
    from compress.linalg import cholesky_rows, output_error, shared_cholesky_, shared_upper_inverse_
    from compress.quantize.gptq import run_gptq

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    world = distributed.world()
    torch.set_num_threads(1)
    factor, weight, gram = together_inputs()
    cholesky, indefinite = torch.full_like(gram, float("nan")), gram.clone()
    for rows in cholesky_rows(len(gram), world, block=64):  # a rank holds only its rows: the others are never read
        cholesky[rows] = gram[rows]
    indefinite[100, 100] = -1
    with distributed.together(world):
        factored = shared_cholesky_(cholesky, world, block=64)  # 320 wide: blocks 0, 2, 4 on rank 0, 1, 3 on rank 1
        refused = not shared_cholesky_(indefinite, world, block=64)
        shared_upper_inverse_(factor, world, block=64)  # 300 wide: rows 0-61 on rank 0, 62-299 on rank 1
        # one machine: rank 0 factors on both ranks' threads and sends the factor; the rows are split as below
        pooled = run_gptq(weight, gram, 3, 32, False, act_order=True, static_groups=True)
        hopeless = gram.clone()
        hopeless[7, 7] = -100 * gram.diagonal().mean()  # no damping makes it positive definite
        try:
            run_gptq(weight, hopeless, 3, 32, False)
            refusal = None
        except ValueError as exc:
            refusal = str(exc)
        linalg.THREADED_LAPACK_BYTES = 0  # a matrix beyond threaded LAPACK: the factorization is split by rows
        result = run_gptq(weight, gram, 3, 32, False, act_order=True, static_groups=True)
        error = output_error(weight, result.dequantized, gram)
        spilled = run_gptq(weight, gram, 3, 32, False, act_order=True, static_groups=True, spill=True)
        broken = gram.clone()
        broken[7, 7] = -0.05 * gram.diagonal().mean()  # damping 0.01 fails, 0.1 holds: a second try
        retried = [run_gptq(weight, broken, 3, 32, False, act_order=True, static_groups=True, spill=spill)
                   for spill in (False, True)]
    assert torch.equal(spilled.ints, result.ints) and torch.equal(spilled.scales, result.scales)
    assert all(r.info.damp_raised and r.info.damp == 0.1 for r in retried)
    assert torch.equal(retried[0].ints, retried[1].ints)  # a spilled Gram's second try reads it from the file
    torch.save({"cholesky": cholesky, "factored": factored, "refused": refused, "inverse": factor,
                "ints": result.ints, "scales": result.scales, "zeros": result.zeros, "loss": result.info.loss,
                "error": error, "pooled": pooled.ints, "refusal": refusal}, f"{out}/together{rank}.pt")
    dist.destroy_process_group()


def together_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(300, 300, generator=generator, dtype=torch.float64).triu_()
    factor.diagonal().add_(20)
    inputs = torch.randn(2000, 320, generator=generator) * torch.linspace(0.1, 3, 320)
    weight = torch.randn(37, 320, generator=generator)  # 37 rows: 18 and 19 on the two ranks
    return factor, weight, (inputs.T @ inputs).double()


def test_two_ranks_solving_one_layer_together_get_what_one_process_gets(tmp_path):
    from compress.linalg import output_error
    from compress.quantize.gptq import run_gptq

    assert spawn_ranks(together_rank, str(tmp_path)) == [0, 0]
    ranks = [torch.load(tmp_path / f"together{rank}.pt") for rank in range(2)]
    for key in ("cholesky", "inverse", "ints", "scales", "zeros", "pooled"):  # every rank holds the whole result
        assert torch.equal(ranks[0][key], ranks[1][key])
    assert ranks[0]["loss"] == ranks[1]["loss"] and ranks[0]["error"] == ranks[1]["error"]
    assert all(rank["factored"] and rank["refused"] for rank in ranks)
    assert ranks[0]["refusal"] == ranks[1]["refusal"] and "not positive definite" in ranks[0]["refusal"]
    factor, weight, gram = together_inputs()
    upper = torch.linalg.cholesky(gram, upper=True)
    assert (ranks[0]["cholesky"] - upper).abs().max() < 1e-13 * upper.abs().max()
    assert torch.equal(ranks[0]["cholesky"].tril(-1), torch.zeros(320, 320, dtype=torch.float64))
    inverse = torch.linalg.inv(factor)
    assert (ranks[0]["inverse"] - inverse).abs().max() < 1e-13 * inverse.abs().max()
    assert torch.equal(ranks[0]["inverse"].tril(-1), torch.zeros(300, 300, dtype=torch.float64))
    one = run_gptq(weight, gram, 3, 32, False, act_order=True, static_groups=True)
    assert torch.equal(ranks[0]["pooled"], one.ints)  # LAPACK's factor, as one process has it
    # the inverse Hessian factor differs from LAPACK's in the last bits of float64: the float32 loop agrees
    assert (ranks[0]["ints"] != one.ints).float().mean() < 1e-3
    assert torch.equal(ranks[0]["scales"], one.scales) and torch.equal(ranks[0]["zeros"], one.zeros)
    assert abs(ranks[0]["loss"] / one.info.loss - 1) < 1e-6
    assert abs(ranks[0]["error"] / output_error(weight, one.dequantized, gram) - 1) < 1e-6
