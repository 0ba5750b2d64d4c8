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
from compress.distributed import owners
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
    context, port = multiprocessing.get_context("spawn"), free_port()
    processes = [context.Process(target=gradient_rank, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0]
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
