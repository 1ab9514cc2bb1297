"""Multi-process Pareto Merging on torch.distributed (gloo, CPU): equal to the single-process run.

Workers are spawned processes (2 or 3) joined with a deadline, so a hang fails the test instead of CI.
Each worker writes what it computed (or the error it raised) to a file the test reads.
"""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from paretomerge import TrainerConfig
from paretomerge.distributed import DistributedSetupError, init_from_env, shard_layers
from paretomerge.methods.pareto_merging import ParetoMergingTrainer, load_checkpoint

from helpers import Tiny

K = 3
DEADLINE_S = 90.0


# ----------------------------------------------------------------------------- the run every process builds
def _demo_trainer(**changes) -> dict:
    """The trainer section of the merge.yaml ``paretomerge demo`` writes (unlabeled mode: diversity and anchor on)."""
    from paretomerge.demo import TASKS, DemoConfig, merge_config_dict

    return {**merge_config_dict(DemoConfig(), TASKS)["trainer"], **changes}


def _build(mode="datafree", steps=6, ckpt_dir=None, every=0, dist=None, lr=0.05, trainer=None, masked=False):
    """Tiny's converted model, K = 3 tasks; ``trainer``: a whole trainer config (dict) instead of the default one;
    ``masked``: logits_fn returns (per-position logits, a ragged mask), as a causal LM's does."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = Tiny()
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()} for _ in range(K)]
    heads = [nn.Linear(12, 5) for _ in range(K)]
    data = [torch.randn(40, 6, 12, generator=g) for _ in range(K)]
    common = dict(mode=mode, steps=steps, checkpoint_dir=ckpt_dir, checkpoint_every=every, progress=False,
                  objective_impl="torch")
    if trainer is None:
        cfg = TrainerConfig(lr=lr, batch_size=8, rank=2, rank_mlp=3, include="attention+mlp", reg_frobenius=1e-3,
                            diversity=0.0, **common)
    else:
        cfg = TrainerConfig(**{**trainer, **common})

    def logits_fn(m, k, x):
        if masked:  # positions 0..n_i of sample i count, n_i from its input: token counts differ between ranks
            h = m(x)
            return heads[k](h), torch.arange(h.shape[1]) <= (x[:, 0, 0].abs() * 4).long().unsqueeze(1)
        return heads[k](m(x).mean(1))

    return ParetoMergingTrainer(copy.deepcopy(base), None, cfg, finetuned=fts, logits_fn=logits_fn, unlabeled=data,
                                task_names=["a", "b", "c"], dist=dist)


def _job(job: str, rank: int, world: int, tmp: Path) -> object:
    dist = init_from_env(timeout_s=20)
    assert dist is not None and (dist.rank, dist.world_size) == (rank, world)
    if job == "datafree":  # 3 steps at world size 2, checkpointed
        t = _build(steps=3, ckpt_dir=str(tmp / "ck2"), every=3, dist=dist)
        t.train()
        return {"history": t.history, "shard": sorted(t.shard_keys), "deltas": sum(
            d.numel() for term in t.datafree.terms for d in term.deltas)}
    if job == "resume3":  # steps 4..6 at world size 3 from the world-size-2 checkpoint
        t = _build(steps=6, ckpt_dir=str(tmp / "ck3"), every=6, dist=dist)
        t.train(resume=tmp / "ck2" / "last.pt")
        return {"history": t.history}
    if job == "unlabeled":
        t = _build(mode="unlabeled", steps=4, ckpt_dir=str(tmp / "cku"), every=4, dist=dist)
        t.train()
        return {"history": t.history}
    if job in EQUALITY_JOBS:  # the demo's trainer config (diversity, anchor), per sample, masked entropies
        t = _build(steps=4, ckpt_dir=str(tmp / f"ck_{job}"), every=4, dist=dist, **EQUALITY_JOBS[job])
        t.train()
        return {"history": t.history}
    if job == "resume_differs":  # node-local output directories: rank 0 has a checkpoint (step 3), rank 1 none
        t = _build(steps=6, dist=dist)
        t.train(resume=tmp / "ck2" / "last.pt" if rank == 0 else None)
        return "no error"
    if job == "resume_fails_on_one":  # rank 1's checkpoint is missing: rank 0 must not go on alone
        t = _build(steps=6, dist=dist)
        t.train(resume=tmp / "ck2" / ("last.pt" if rank == 0 else "missing.pt"))
        return "no error"
    if job == "mismatch":  # rank 1 was given another learning rate
        _build(steps=2, dist=dist, lr=0.05 if rank == 0 else 0.01)
        return "no error"
    if job == "dead":  # rank 1 dies after joining; rank 0's next collective must fail, not hang
        if rank == 1:
            os._exit(3)
        t0 = time.monotonic()
        _build(steps=2, dist=dist)
        return f"no error after {time.monotonic() - t0:.1f}s"
    if job == "fsdp2":
        return _fsdp2_step(dist)
    raise ValueError(job)


EQUALITY_JOBS = {
    "unlabeled_demo": dict(mode="unlabeled", trainer=_demo_trainer()),
    "unlabeled_demo_per_sample": dict(mode="unlabeled", trainer=_demo_trainer(per_sample=True)),
    "unlabeled_masked": dict(mode="unlabeled", trainer=_demo_trainer(diversity=0.0), masked=True),
    "unlabeled_masked_per_sample": dict(mode="unlabeled", trainer=_demo_trainer(diversity=0.0, per_sample=True),
                                        masked=True),
    "datafree_per_sample": dict(trainer=_demo_trainer(per_sample=True, batch_size=4, lr=0.01)),
}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    import paretomerge as pm

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    pm.convert(model.model, K, 2, include=None, impl="torch")
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith((".U", ".G", ".V")))
    return model


def _llama_loss(model) -> torch.Tensor:
    import paretomerge as pm

    ids = torch.arange(24).reshape(2, 12) % 32
    with pm.use_preference([0.5, 0.3, 0.2]):
        return model(input_ids=ids, labels=ids).loss


def _fsdp2_step(dist) -> dict:
    """FSDP2 on the converted tiny Llama's decoder blocks (frozen base weights sharded); same input on
    every rank, so the averaged gradients equal the single-process ones."""
    from torch.distributed.fsdp import fully_shard

    model = _tiny_llama()
    with torch.no_grad():  # U starts at 0: give it values so every factor gets a gradient
        for n, p in model.named_parameters():
            if n.endswith(".U"):
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    sharded = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"]
    loss = _llama_loss(model)
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": float(loss.detach()), "grads": grads, "sharded": len(sharded)}


def _worker(rank: int, world: int, port: int, jobs: list, tmp: str) -> None:
    """Run ``jobs`` in order in one process group (a job's error is recorded and the next job runs)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for job in jobs:
        try:
            out = _job(job, rank, world, Path(tmp))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        torch.save(out, Path(tmp) / f"{job}.rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(jobs: list, world: int, tmp: Path, deadline_s: float = DEADLINE_S) -> dict:
    """{job: [rank 0's result, ...]} of ``world`` spawned processes running ``jobs``."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, jobs, str(tmp)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"{jobs}: ranks {hung} still running after {deadline_s}s"
    return {job: [torch.load(tmp / f"{job}.rank{r}.pt", weights_only=False) if (tmp / f"{job}.rank{r}.pt").exists()
                  else None for r in range(world)] for job in jobs}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process group runs the data-free, unlabeled, FSDP2 and mismatch jobs (process start-up is the cost)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    return tmp, _spawn(["datafree", "unlabeled", *EQUALITY_JOBS, "fsdp2", "resume_differs", "resume_fails_on_one",
                        "mismatch"], 2, tmp)


def _ok(results: list) -> list:
    for r, res in enumerate(results):
        assert not (isinstance(res, dict) and "error" in res), f"rank {r}: {res['trace']}"
    return results


def _assert_same_state(a: dict, b: dict, atol=2e-6, rtol=1e-4) -> None:
    assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=atol, rtol=rtol, msg=k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for i in sa:
        for k in sa[i]:
            torch.testing.assert_close(sa[i][k], sb[i][k], atol=atol, rtol=rtol, msg=f"optimizer {i} {k}")
    torch.testing.assert_close(a["normalizer"]["scale"], b["normalizer"]["scale"], rtol=1e-6, atol=0)
    assert a["run_hash"] == b["run_hash"]
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])


def _assert_same_history(h1: list, h2: list) -> None:
    assert [r["step"] for r in h1] == [r["step"] for r in h2]
    for r1, r2 in zip(h1, h2):
        for k in r1:
            assert r1[k] == pytest.approx(r2[k], rel=1e-5, abs=1e-7), (r1, r2)


# ----------------------------------------------------------------------------- tests
def test_shard_layers_balanced_and_deterministic():
    sizes = [432, 144, 240, 240]  # Tiny: in_proj 3E×E, out_proj E×E, two MLP weights
    assert shard_layers(sizes, 1) == [0, 0, 0, 0]
    two = shard_layers(sizes, 2)
    assert two == shard_layers(list(sizes), 2)
    loads = [sum(s for s, o in zip(sizes, two) if o == r) for r in range(2)]
    assert max(loads) - min(loads) <= max(sizes) and set(two) == {0, 1}
    assert sorted(set(shard_layers(sizes, 4))) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="world size 5 is larger than the number of converted weights \\(4\\)"):
        shard_layers(sizes, 5)


def test_missing_master_addr_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR is not set"):
        init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() is None


def test_sharded_datafree_equals_single_process_and_resumes_at_other_world_sizes(two_ranks):
    tmp_path, results = two_ranks
    res2 = _ok(results["datafree"])
    # every rank holds only its own layers' deltas; together exactly all of them, once
    shards = [set(r["shard"]) for r in res2]
    assert shards[0].isdisjoint(shards[1]) and len(shards[0] | shards[1]) == 4
    single = _build(steps=3, ckpt_dir=str(tmp_path / "ck1"), every=3)
    single.train()
    assert sum(r["deltas"] for r in res2) == sum(d.numel() for t in single.datafree.terms for d in t.deltas)
    for r in res2:  # the loss and the objectives of every step, on every rank
        _assert_same_history(r["history"], single.history)
    ck2 = load_checkpoint(tmp_path / "ck2" / "last.pt")
    _assert_same_state(ck2, load_checkpoint(tmp_path / "ck1" / "last.pt"))
    assert not list((tmp_path / "ck2").glob(".*"))  # rank 0 alone wrote, atomically

    straight = _build(steps=6)
    straight.train()
    ref6 = straight.state()
    # world size 2 -> 1
    one = _build(steps=6)
    one.train(resume=tmp_path / "ck2" / "last.pt")
    _assert_same_state(one.state(), ref6)
    # world size 2 -> 3
    res3 = _ok(_spawn(["resume3"], 3, tmp_path)["resume3"])
    for r in res3:
        _assert_same_history(r["history"], straight.history[3:])
    _assert_same_state(load_checkpoint(tmp_path / "ck3" / "last.pt"), ref6)


def test_unlabeled_ddp_equals_single_process_on_the_whole_batch(two_ranks):
    tmp_path, results = two_ranks
    res = _ok(results["unlabeled"])
    single = _build(mode="unlabeled", steps=4, ckpt_dir=str(tmp_path / "cku1"), every=4)
    single.train()
    for r in res:
        _assert_same_history(r["history"], single.history)
    _assert_same_state(load_checkpoint(tmp_path / "cku" / "last.pt"), load_checkpoint(tmp_path / "cku1" / "last.pt"))


@pytest.mark.parametrize("job", list(EQUALITY_JOBS))
def test_every_term_and_per_sample_pref_equal_single_process(two_ranks, job):
    """The demo's own trainer config: the batch-diversity term's mean prediction, the anchor, per-sample γ and
    masked (ragged) entropies are the whole batch's at 2 processes, as in one (per-sample γ data-free too)."""
    tmp_path, results = two_ranks
    res = _ok(results[job])
    single = _build(steps=4, ckpt_dir=str(tmp_path / f"ck_{job}_1"), every=4, **EQUALITY_JOBS[job])
    single.train()
    for r in res:
        _assert_same_history(r["history"], single.history)
    _assert_same_state(load_checkpoint(tmp_path / f"ck_{job}" / "last.pt"),
                       load_checkpoint(tmp_path / f"ck_{job}_1" / "last.pt"))


def test_ranks_resuming_different_checkpoints_fail_on_every_rank_not_hang(two_ranks):
    res = two_ranks[1]["resume_differs"]
    for r in res:
        assert isinstance(r, dict) and r["error"].startswith("DistributedSetupError"), r
        assert "the processes resume from different states: rank 0 resumes" in r["error"]
        assert "at step 3, rank 1 starts at step 0 (no checkpoint)" in r["error"]
    res = two_ranks[1]["resume_fails_on_one"]
    assert res[1]["error"].startswith("FileNotFoundError") and "missing.pt" in res[1]["error"], res[1]
    assert res[0]["error"].startswith("DistributedSetupError: rank 1 failed: FileNotFoundError"), res[0]


def test_ranks_that_disagree_on_the_run_fail_on_every_rank(two_ranks):
    res = two_ranks[1]["mismatch"]
    for r in res:
        assert isinstance(r, dict) and r["error"].startswith("RunMismatchError"), r
        assert "rank 1 differs from rank 0 in trainer.lr: 0.05 -> 0.01" in r["error"]


def test_a_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    res = _spawn(["dead"], 2, tmp_path, deadline_s=60)["dead"]
    assert res[1] is None  # it died
    assert isinstance(res[0], dict) and "error" in res[0], res[0]


def test_fsdp2_on_a_tiny_llama_gives_the_single_process_gradients(two_ranks):
    pytest.importorskip("transformers")
    res = _ok(two_ranks[1]["fsdp2"])
    model = _tiny_llama()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".U"):
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    loss = _llama_loss(model)
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for r in res:
        assert r["sharded"] > 0 and r["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
        assert r["grads"].keys() == ref.keys() and any(k.endswith(".G") for k in ref)
        for k in ref:
            torch.testing.assert_close(r["grads"][k], ref[k], atol=1e-6, rtol=1e-4, msg=k)


def test_cli_nproc_2_runs_torchrun_and_resumes_at_1(tmp_path):
    from _pool_files import write_config, write_pool

    cfg = write_pool(tmp_path)
    cfg["trainer"]["steps"] = 3
    cfg["trainer"]["objective_impl"] = "torch"  # no C++ build in the workers: start-up is the cost here
    path = write_config(tmp_path, cfg)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "paretomerge", "merge", "--config", str(path), "--nproc", "2",
           "--dist-timeout", "30"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=2 * DEADLINE_S)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("trained Pareto Merging checkpoint") == 1  # rank 0 alone reports
    two = load_checkpoint(tmp_path / "out" / "pareto_merged.pt")
    assert two["step"] == 3 and not list((tmp_path / "out").glob(".*.tmp"))
    # the same run in one process: the same result; the world-size-2 checkpoint is taken as this run's
    cfg1 = copy.deepcopy(cfg)
    cfg1["output"]["dir"] = "out1"
    from paretomerge.cli import main
    assert main(["merge", "--config", str(write_config(tmp_path, cfg1, "c1.yaml"))]) == 0
    one = load_checkpoint(tmp_path / "out1" / "pareto_merged.pt")
    _assert_same_state(two, one)
    cfg["trainer"]["steps"] = 4
    assert main(["merge", "--config", str(write_config(tmp_path, cfg))]) == 0
    assert load_checkpoint(tmp_path / "out" / "pareto_merged.pt")["step"] == 4


# ----------------------------------------------------------------------------- manual launches (one process per rank)
def _launch_ranks(configs: list, timeout_s: float = 20) -> list:
    """Start ``paretomerge merge --config configs[r]`` as rank r of len(configs), as torchrun (or a job scheduler,
    one process per node) would: RANK/WORLD_SIZE/MASTER_* set, no launcher around them."""
    port = _free_port()
    procs = []
    for r, path in enumerate(configs):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RANK": str(r), "LOCAL_RANK": str(r),
               "WORLD_SIZE": str(len(configs)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "paretomerge", "merge", "--config", str(path),
                                       "--dist-timeout", str(timeout_s)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _finish(proc, timeout_s: float = 2 * DEADLINE_S) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"still running after {timeout_s}s") from None
    return proc.returncode, err


@pytest.mark.slow
def test_cli_ranks_with_different_checkpoints_stop_at_once_with_one_line(tmp_path):
    """Node-local output directories: rank 0's holds checkpoints/last.pt (step 2), rank 1's is empty. Before,
    both waited in different collectives until --dist-timeout."""
    from _pool_files import write_config, write_pool

    from paretomerge.cli import main

    cfg = write_pool(tmp_path)
    cfg["trainer"].update(steps=2, objective_impl="torch")
    cfg["output"]["dir"] = "node0"
    assert main(["merge", "--config", str(write_config(tmp_path, cfg, "node0.yaml"))]) == 0
    cfg["trainer"]["steps"] = 4
    configs = [write_config(tmp_path, cfg, "node0.yaml")]
    cfg["output"]["dir"] = "node1"
    configs.append(write_config(tmp_path, cfg, "node1.yaml"))
    for r, p in enumerate(_launch_ranks(configs, timeout_s=600)):
        rc, err = _finish(p)  # within 2 * DEADLINE_S, far below the collectives' timeout
        assert rc == 2 and len(err.strip().splitlines()) == 1, err[-3000:]
        assert err.startswith(f"paretomerge merge: error (rank {r}): the processes resume from different states: "
                              f"rank 0 resumes "), err
        assert "at step 2, rank 1 starts at step 0 (no checkpoint)" in err, err
    assert load_checkpoint(tmp_path / "node0" / "checkpoints" / "last.pt")["step"] == 2  # untouched


@pytest.mark.slow
def test_cli_a_rank_whose_peer_is_killed_says_one_line_and_exits_2(tmp_path):
    """SIGKILL one rank of a manual launch: the survivor's collective fails (gloo: connection closed), which it
    reports in one line with exit status 2 (before: a raw gloo traceback, exit 1)."""
    import signal

    from _pool_files import write_config, write_pool

    cfg = write_pool(tmp_path)
    cfg["trainer"].update(steps=10**6, checkpoint_every=1, objective_impl="torch")
    procs = _launch_ranks([write_config(tmp_path, cfg)] * 2, timeout_s=60)
    last = tmp_path / "out" / "checkpoints" / "last.pt"
    end = time.monotonic() + 2 * DEADLINE_S
    while not last.exists() and time.monotonic() < end and procs[0].poll() is None:
        time.sleep(0.2)  # training has started on both ranks once rank 0 wrote a checkpoint
    procs[1].send_signal(signal.SIGKILL)
    rc, err = _finish(procs[0])
    procs[1].communicate()
    assert rc == 2 and len(err.strip().splitlines()) == 1, err[-3000:]
    assert err.startswith("paretomerge merge: error (rank 0): lost the other processes in "), err
