"""A merge run's lifecycle is safe: non-finite training stops, a changed run is not resumed, one run per output
directory, and temp files of a killed run are cleaned (issue 11, items 2-4 and the `.tmp` leftover)."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from paretomerge import TrainerConfig
from paretomerge.cli import main
from paretomerge.config import ConfigError, from_dict
from paretomerge.methods.pareto_merging import (NonFiniteTrainingError, ParetoMergingTrainer, RunMismatchError,
                                                load_checkpoint)
from paretomerge.program import LOCK_FILE, output_lock

from _pool_files import write_config, write_pool
from helpers import Tiny


def _error_lines(capsys) -> list[str]:
    """The CLI's error lines (torch may print its own warnings on stderr too)."""
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("paretomerge")]


# ----------------------------------------------------------------------------- 2. non-finite
@pytest.mark.parametrize("field,value", [("weight_decay", float("inf")), ("reg_frobenius", float("nan")),
                                         ("lr", float("inf")), ("mu", float("nan")), ("ideal", [float("nan")] * 3),
                                         ("adamerging_init", float("-inf"))])
def test_nonfinite_config_floats_are_rejected(field, value):
    with pytest.raises(ConfigError, match=f"^trainer.{field}"):
        TrainerConfig(**{field: value})
    cfg = {"pool": {"format": "hf", "pretrained": "p", "finetuned": {"a": "a"}}, "trainer": {field: value}}
    with pytest.raises(ConfigError, match=f"^trainer.{field}"):
        from_dict(cfg)


def _tiny_trainer(tmp_path, lr=0.05, steps=2, nan=False, every=1):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = Tiny()
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()} for _ in range(3)]
    if nan:
        fts[1]["mlp.0.weight"][0, 0] = float("nan")
    cfg = TrainerConfig(steps=steps, lr=lr, rank=2, include="attention+mlp", progress=False,
                        checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=every,
                        objective_impl="torch")  # no C++ build: these tests are about the run, not the kernel
    return ParetoMergingTrainer(copy.deepcopy(base), None, cfg, finetuned=fts)


def test_nan_loss_stops_before_any_checkpoint(tmp_path):
    t = _tiny_trainer(tmp_path, nan=True)
    with pytest.raises(NonFiniteTrainingError, match="step 1: the loss is nan"):
        t.train()
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").iterdir())


def test_nonfinite_parameter_stops_and_names_it(tmp_path):
    t = _tiny_trainer(tmp_path)
    step = t.optimizer.step

    def step_then_overflow():  # as an overflowing update would
        step()
        with torch.no_grad():
            t.params[4].fill_(float("inf"))

    t.optimizer.step = step_then_overflow
    with pytest.raises(NonFiniteTrainingError, match=r"step 1: a trained parameter is NaN/Inf \(parameter '.*'\)"):
        t.train()
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").iterdir())


def test_nonfinite_resumed_run_overwrites_no_checkpoint(tmp_path):
    _tiny_trainer(tmp_path, steps=2).train()
    last = (tmp_path / "ck" / "last.pt").read_bytes()
    t = _tiny_trainer(tmp_path, steps=4, nan=True)  # same run identity, the weights went bad in memory
    with pytest.raises(NonFiniteTrainingError, match="step 3"):
        t.train(resume=tmp_path / "ck" / "last.pt")
    assert (tmp_path / "ck" / "last.pt").read_bytes() == last
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["last.pt", "step000001.pt", "step000002.pt"]


def test_cli_nonfinite_exits_2_with_one_line(tmp_path, capsys):
    cfg = write_pool(tmp_path, nan_in="b")
    rc = main(["merge", "--config", str(write_config(tmp_path, cfg))])
    err = _error_lines(capsys)
    assert rc == 2 and len(err) == 1 and "training stopped at step 1: the loss is nan" in err[0], err
    assert not (tmp_path / "out" / "pareto_merged.pt").exists()


# ----------------------------------------------------------------------------- 3. resume of a changed run
def test_resume_refuses_a_changed_config_and_fresh_starts_over(tmp_path, capsys):
    cfg = write_pool(tmp_path)
    path = write_config(tmp_path, cfg)
    assert main(["merge", "--config", str(path)]) == 0
    first = load_checkpoint(tmp_path / "out" / "pareto_merged.pt")
    changed = copy.deepcopy(cfg)
    changed["trainer"]["seed"] = 1
    changed["trainer"]["lr"] = 0.01
    capsys.readouterr()
    assert main(["merge", "--config", str(write_config(tmp_path, changed))]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "trainer.lr: 0.05 -> 0.01" in err[0] and "trainer.seed: 0 -> 1" in err[0], err
    assert "--fresh" in err[0]
    key = "transformer.resblocks.0.mlp.c_fc.U"
    assert torch.equal(load_checkpoint(tmp_path / "out" / "pareto_merged.pt")["model"][key], first["model"][key])
    assert main(["merge", "--config", str(write_config(tmp_path, changed)), "--fresh"]) == 0
    fresh = load_checkpoint(tmp_path / "out" / "pareto_merged.pt")
    assert fresh["config"]["seed"] == 1 and fresh["step"] == 2
    assert not torch.equal(fresh["model"]["transformer.resblocks.0.mlp.c_fc.U"],
                           first["model"]["transformer.resblocks.0.mlp.c_fc.U"])


def test_resume_of_the_same_run_continues_and_more_steps_extend_it(tmp_path):
    cfg = write_pool(tmp_path)
    assert main(["merge", "--config", str(write_config(tmp_path, cfg))]) == 0
    longer = copy.deepcopy(cfg)
    longer["trainer"]["steps"] = 3  # steps are not part of the run's identity
    assert main(["merge", "--config", str(write_config(tmp_path, longer))]) == 0
    assert load_checkpoint(tmp_path / "out" / "pareto_merged.pt")["step"] == 3


def test_resume_refuses_a_changed_pool_file_and_mode(tmp_path, capsys):
    cfg = write_pool(tmp_path)
    assert main(["merge", "--config", str(write_config(tmp_path, cfg))]) == 0
    unl = copy.deepcopy(cfg)
    unl["mode"] = "unlabeled"
    unl["unlabeled"] = {t: f"u{t}.safetensors" for t in cfg["pool"]["finetuned"]}
    capsys.readouterr()
    assert main(["merge", "--config", str(write_config(tmp_path, unl))]) == 2
    assert "trainer.mode: 'datafree' -> 'unlabeled'" in capsys.readouterr().err
    write_pool(tmp_path, seed=1)  # same paths, new contents
    assert main(["merge", "--config", str(write_config(tmp_path, cfg))]) == 2
    assert "identity.files.pool.finetuned.a" in capsys.readouterr().err


def test_trainer_load_state_names_the_difference(tmp_path):
    t = _tiny_trainer(tmp_path)
    t.train()
    other = _tiny_trainer(tmp_path, lr=0.01)
    with pytest.raises(RunMismatchError, match=r"trainer.lr: 0.05 -> 0.01"):
        other.train(resume=tmp_path / "ck" / "last.pt")
    ck = load_checkpoint(tmp_path / "ck" / "last.pt")
    del ck["run_identity"]
    with pytest.raises(RunMismatchError, match="no run identity"):
        _tiny_trainer(tmp_path).load_state(ck)


# ----------------------------------------------------------------------------- 4. one run per output directory
def test_second_run_on_a_locked_output_fails_at_once(tmp_path, capsys):
    cfg = write_pool(tmp_path)
    path = write_config(tmp_path, cfg)
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(Exception, match="in use by another paretomerge run"):
            with output_lock(out):
                pass
        assert main(["merge", "--config", str(path)]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "in use by another paretomerge run" in err[0]
    assert not (out / "checkpoints").exists()
    assert main(["merge", "--config", str(path)]) == 0  # released


def test_lock_held_by_another_process(tmp_path, capsys):
    cfg = write_pool(tmp_path)
    path = write_config(tmp_path, cfg)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from filelock import FileLock
        with FileLock({str(out / LOCK_FILE)!r}):
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["merge", "--config", str(path)]) == 2
        assert "in use by another paretomerge run" in capsys.readouterr().err
    finally:
        holder.communicate("", timeout=30)
    assert main(["merge", "--config", str(path)]) == 0


# ----------------------------------------------------------------------------- stale temp files
def test_stale_temp_files_of_a_killed_run_are_removed(tmp_path):
    cfg = write_pool(tmp_path)
    path = write_config(tmp_path, cfg)
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    ours = [out / ".pareto_merged.pt.k2j_x9a0.tmp", out / "checkpoints" / ".last.pt.abcdefgh.tmp",
            out / "checkpoints" / ".step000001.pt.12345678.tmp"]
    foreign = [out / ".notes.txt.abcdefgh.tmp", out / ".pareto_merged.pt.short.tmp", out / "pareto_merged.pt.tmp"]
    for f in ours + foreign:
        f.write_bytes(b"x")
    with output_lock(out):  # another run holds the directory: nothing is touched
        assert main(["merge", "--config", str(path)]) == 2
    assert all(f.exists() for f in ours + foreign)
    assert main(["merge", "--config", str(path)]) == 0
    assert not any(f.exists() for f in ours)
    assert all(f.exists() for f in foreign)
