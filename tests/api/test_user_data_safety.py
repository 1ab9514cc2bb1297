"""Nothing a user owns is lost, every expected failure is one line, baselines as their papers mean them
(issue 21, sections 3 and 4): export overwrite and temp entries, Hugging Face pools of one architecture,
`plan` counts what `merge` builds, input checks, `--fresh`, MAP's γ → solution rule and clipped surrogates."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import pmkernels
from paretomerge.cli import main
from paretomerge.io import EXPORT_MARKER, OutputLockedError, atomic_directory, atomic_write, target_lock

from _pool_files import write_config, write_pool

ROOT = Path(__file__).resolve().parents[2]  # tests/api/ -> the repository
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python_api"),
                                                   os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _error_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("paretomerge")]


def _temp_entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- export directories
def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    afile = tmp_path / "afile"
    afile.write_text("precious")
    for target, what in ((mine, f"is a directory that paretomerge did not write \\(no {EXPORT_MARKER}"),
                         (afile, "is a file, not a paretomerge export")):
        with pytest.raises(FileExistsError, match=what) as e:
            with atomic_directory(target, overwrite=True, name="out_dir") as tmp:
                (tmp / "new").write_text("x")
        assert str(target) in str(e.value)
    assert (mine / "thesis.txt").read_text() == "precious" and afile.read_text() == "precious"
    with atomic_directory(tmp_path / "exp") as tmp:  # an export: it gets the marker ...
        (tmp / "v").write_text("1")
    assert json.loads((tmp_path / "exp" / EXPORT_MARKER).read_text())["written_by"] == "paretomerge"
    with atomic_directory(tmp_path / "exp", overwrite=True) as tmp:  # ... so it can be replaced
        (tmp / "v").write_text("2")
    assert (tmp_path / "exp" / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "exp", "mine"]  # no temp entry, no lock
    (tmp_path / "link").symlink_to(tmp_path / "exp")  # a link is not replaced, even to an export
    with pytest.raises(FileExistsError, match="a symbolic link"):
        with atomic_directory(tmp_path / "link", overwrite=True):
            pass
    assert (tmp_path / "link").is_symlink()


def test_out_dot_names_the_working_directory(tmp_path, monkeypatch):
    """``--out .`` wrote ``..tmp-*`` / ``..old-*`` into the cwd and failed (EBUSY renaming "."); now "." is the
    directory it names, replaced beside itself."""
    exp = tmp_path / "exp"
    with atomic_directory(exp) as tmp:
        (tmp / "v").write_text("1")
    monkeypatch.chdir(exp)
    with atomic_directory(".", overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    os.chdir(tmp_path)  # the old cwd was replaced
    assert (exp / "v").read_text() == "2" and (exp / EXPORT_MARKER).is_file()
    assert sorted(p.name for p in exp.iterdir()) == [EXPORT_MARKER, "v"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_a_second_writer_of_the_same_target_fails_at_once(tmp_path):
    with target_lock(tmp_path / "out"):
        with pytest.raises(OutputLockedError, match="being written by another process"):
            with atomic_directory(tmp_path / "out"):
                pass
        with pytest.raises(OutputLockedError):
            atomic_write(tmp_path / "out", lambda p: Path(p).write_text("x"))
        atomic_write(tmp_path / "other", lambda p: Path(p).write_text("x"))  # another target: fine
    assert not (tmp_path / "out").exists()


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from paretomerge.io import atomic_directory
with atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "part").write_bytes(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_write_is_cleaned_by_the_next_write_of_that_target(tmp_path):
    target = tmp_path / "model"
    foreign = [tmp_path / ".notes.tmp-abcdefgh", tmp_path / ".other.abcdefgh.tmp"]  # another target's: kept
    foreign[0].mkdir()
    foreign[1].write_text("x")
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], env=ENV, capture_output=True)
    assert r.returncode == -signal.SIGKILL
    left = [n for n in _temp_entries(tmp_path) if n.startswith(".model.")]
    assert any(n.startswith(".model.tmp-") for n in left) and ".model.lock" in left, left  # SIGKILL: left
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("1")
    assert _temp_entries(tmp_path) == sorted(p.name for p in foreign)  # ours (and the lock file) gone
    # atomic_write's temp files likewise (as a killed write leaves them: same names, an unlocked lock file)
    (tmp_path / ".model.safetensors.k2j_x9a0.tmp").write_bytes(b"partial")
    (tmp_path / ".model.safetensors.lock").write_bytes(b"")
    atomic_write(tmp_path / "model.safetensors", lambda p: Path(p).write_text("1"))
    assert _temp_entries(tmp_path) == sorted(p.name for p in foreign)


def test_sigterm_during_export_leaves_nothing_and_says_one_line(tmp_path):
    """SIGTERM is handled like SIGINT: the atomic writer removes its temp directory; exit 143, one line."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        from paretomerge import cli, io
        def fake_export(args):
            with io.atomic_directory(args.out) as tmp:
                (tmp / "part").write_text("partial")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
        cli.cmd_export = fake_export
        sys.exit(cli.main(["export", "--checkpoint", "x", "--pref", "1", "--out", sys.argv[1], "--format", "hf"]))
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hf")], env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 128 + signal.SIGTERM
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("paretomerge")]
    assert lines == ["paretomerge export: interrupted (SIGTERM); nothing was left half written"], r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- Hugging Face pools
transformers = pytest.importorskip("transformers")


def _tiny_gpt2(positions: int = 16):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=positions,
                                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_mixed_architectures_are_refused_before_anything_is_built(tmp_path, monkeypatch):
    from paretomerge.pools import ModelPool
    from paretomerge.pools.pool import ArchitectureMismatchError
    from test_pools_lazy import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")
    _tiny_gpt2().save_pretrained(tmp_path / "gpt2")

    def no_build(*a, **k):  # LlamaForCausalLM.from_pretrained(gpt2_dir) built a default (7B) Llama: OOM
        raise AssertionError("a model was built")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", no_build)
    for auto in (None, "AutoModelForCausalLM"):
        with pytest.raises(ArchitectureMismatchError, match=r"finetuned_dirs\['b'\].*model_type 'gpt2' vs 'llama'"):
            ModelPool.from_hf_dirs(tmp_path / "llama", {"a": tmp_path / "llama", "b": tmp_path / "gpt2"},
                                   auto_class=auto)


def test_merge_with_an_hf_pool_of_mixed_architectures_is_one_line(tmp_path, capsys):
    from test_pools_lazy import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "pre")
    _tiny_gpt2().save_pretrained(tmp_path / "b")
    cfg = {"pool": {"format": "hf", "pretrained": "pre", "finetuned": {"a": "pre", "b": "b"}},
           "trainer": {"steps": 1, "rank": 2}, "output": {"dir": "out"}}
    assert main(["merge", "--config", str(write_config(tmp_path, cfg))]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("paretomerge merge: error: finetuned_dirs['b']: ") and "model_type 'gpt2'" in line
    assert not (tmp_path / "out" / "pareto_merged.pt").exists()


def test_unknown_architectures_class_is_an_error_not_automodel(tmp_path):
    from paretomerge.pools import ModelPool

    _tiny_gpt2().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPT2BananaModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2BananaModel.*auto_class"):
        ModelPool.from_hf_dirs(tmp_path / "m", {"a": tmp_path / "m"})
    pool = ModelPool.from_hf_dirs(tmp_path / "m", {"a": tmp_path / "m"}, auto_class="AutoModelForCausalLM")
    assert "lm_head.weight" in pool.pretrained.state_dict()


def _hf_pool_dirs(tmp_path):
    from test_pools_lazy import tiny_llama

    for d, seed in (("pre", 0), ("a", 1), ("b", 2)):
        tiny_llama(seed).save_pretrained(tmp_path / d)
    return {"pool": {"format": "hf", "pretrained": "pre", "finetuned": {"a": "a", "b": "b"}},
            "base": {"method": "task_arithmetic", "lam": 0.5}, "mode": "datafree",
            "trainer": {"steps": 1, "rank": 2, "include": "attention", "objective_impl": "torch",
                        "progress": False},
            "output": {"dir": "out"}}


def test_plan_counts_what_merge_builds_and_rejects_what_merge_rejects(tmp_path, capsys):
    from paretomerge.config import load_config
    from paretomerge.program import base_merge, load_pool

    cfg = _hf_pool_dirs(tmp_path)
    path = write_config(tmp_path, cfg)
    built = base_merge(load_config(path), load_pool(load_config(path)))
    assert "lm_head.weight" in built.state_dict()
    want = sum(t.numel() * t.element_size() for t in built.state_dict().values())
    assert main(["plan", str(path)]) == 0
    assert f"| base_merge | {want} |" in capsys.readouterr().out  # AutoModel missed lm_head: 74,368 < 86,656
    bad = write_config(tmp_path, {**cfg, "pool": {**cfg["pool"], "auto_class": "AutoBanana"}}, "bad.yaml")
    assert main(["plan", str(bad)]) == 2
    assert _error_lines(capsys) == ["paretomerge plan: error: pool.auto_class: 'AutoBanana' is not a "
                                    "transformers auto class"]
    huge = write_config(tmp_path, {**cfg, "trainer": {**cfg["trainer"], "rank": 2**62}}, "huge.yaml")
    assert main(["plan", str(huge)]) == 2  # was: RuntimeError "Storage size calculation overflowed"
    (line,) = _error_lines(capsys)
    assert line.startswith("paretomerge plan: error: trainer.rank: 4611686018427387904 is too large")


def test_plan_on_a_peft_config_without_auto_class(tmp_path, capsys):
    """Was a TypeError traceback (getattr(transformers, None)); now config.json's class, as merge builds."""
    from test_peft_pool import make_adapter
    from test_pools_lazy import tiny_llama

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    for t in ("a", "b"):
        make_adapter(base, tmp_path / t, seed=1, r=2, lora_alpha=4)
    cfg = {"pool": {"format": "peft", "pretrained": "base", "finetuned": {"a": "a", "b": "b"}},
           "trainer": {"include": "attention", "rank": 2}}
    assert main(["plan", str(write_config(tmp_path, cfg))]) == 0
    want = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    assert f"| base_merge | {want} |" in capsys.readouterr().out


def test_hf_merge_without_auto_class_rebuilds_from_its_checkpoint(tmp_path):
    """The checkpoint records the class merge built (LlamaForCausalLM), not "AutoModel" (whose keys differ)."""
    from paretomerge.config import load_config
    from paretomerge.program import model_from_checkpoint, run_merge

    path = write_config(tmp_path, _hf_pool_dirs(tmp_path))
    ckpt = run_merge(load_config(path))
    model, ck = model_from_checkpoint(ckpt)
    assert ck["meta"]["architecture"]["auto_class"] == "LlamaForCausalLM"
    assert type(model).__name__ == "LlamaForCausalLM"


# ----------------------------------------------------------------------------- causal-LM inputs
@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    import paretomerge as pm
    from test_llm import _save_tiny_tokenizer

    d = tmp_path_factory.mktemp("gpt2")
    m = _tiny_gpt2(positions=16)
    m.save_pretrained(d / "model")
    _save_tiny_tokenizer(d / "model")
    fts = [{n: t + 0.05 * torch.randn_like(t) for n, t in m.state_dict().items()} for _ in range(2)]
    meta = {"architecture": {"kind": "hf", "dir": str(d / "model"), "auto_class": "AutoModelForCausalLM"}}
    cfg = pm.TrainerConfig(mode="datafree", steps=1, rank=2, include="attention+mlp", progress=False,
                           objective_impl="torch")
    trainer = pm.ParetoMergingTrainer(m, finetuned=fts, config=cfg, meta=meta)
    trainer.train()
    trainer.save_checkpoint(d / "pm.pt")
    return d / "pm.pt"


def test_generate_past_the_models_positions_is_one_line(gpt2_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(" ".join(f"w{4 + i}" for i in range(20)) + "\n")  # 20 tokens > n_positions = 16
    argv = ["generate", "--checkpoint", str(gpt2_checkpoint), "--prompts", str(prompts), "--pref", "0.5,0.5",
            "--max-new-tokens", "2"]
    assert main(argv) == 2  # was: IndexError "index out of range in self" (a traceback)
    (line,) = _error_lines(capsys)
    assert "need 22 positions but the model has 16" in line
    prompts.write_text("w4 w5 w6\n")
    assert main(argv[:-1] + ["14"]) == 2  # 3 + 14 > 16
    assert main(argv) == 0


def test_export_over_a_users_directory_or_file_is_refused(gpt2_checkpoint, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    (tmp_path / "afile").write_text("precious")
    for fmt in ("hf", "peft"):
        for out in (mine, tmp_path / "afile"):
            argv = ["export", "--checkpoint", str(gpt2_checkpoint), "--pref", "0.5,0.5", "--out", str(out),
                    "--format", fmt, "--overwrite"]
            assert main(argv) == 2
            (line,) = _error_lines(capsys)
            assert str(out) in line and "overwrite replaces only an earlier export" in line
    assert (mine / "thesis.txt").read_text() == "precious" and (tmp_path / "afile").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mine"]


def test_export_peft_bad_preferences_and_names(gpt2_checkpoint, tmp_path):
    from paretomerge import llm
    from paretomerge.program import model_from_checkpoint

    model, _ = model_from_checkpoint(gpt2_checkpoint)
    with pytest.raises(ValueError, match=r"prefs\['pref_0'\] has 3 entries but the model has K = 2"):
        llm.export_peft(model, [[0.2, 0.3, 0.5]], tmp_path / "a")  # was: an einsum RuntimeError
    with pytest.raises(ValueError, match="prefs: adapter name .* NUL byte"):
        llm.export_peft(model, {"a\x00b": [0.5, 0.5]}, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- MergeKit factors file
def test_mergekit_corrupt_factors_file_is_one_line(tmp_path, capsys):
    pytest.importorskip("mergekit")
    import yaml

    from paretomerge.integrations.factors import FactorsFileError, ParetoFactors
    from paretomerge.integrations.mergekit import main as mergekit_main

    bad = tmp_path / "f.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(FactorsFileError, match="factors: .*f.safetensors.* not a readable safetensors file"):
        ParetoFactors(bad)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "pareto_merging", "base_model": str(tmp_path),
                                   "models": [{"model": str(tmp_path)}],
                                   "parameters": {"factors": str(bad), "preference": "1"}}))
    with pytest.raises(SystemExit) as e:
        mergekit_main([str(cfg), str(tmp_path / "out")])
    assert e.value.code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("paretomerge")]
    assert "parameter 'factors'" in line and str(bad) in line


# ----------------------------------------------------------------------------- input checks
def test_low_rank_distances_checks_delta_sq():
    g = torch.Generator().manual_seed(0)
    out, inn, r, R, K = 7, 5, 3, 2, 2
    U, V = torch.randn(out, r, generator=g), torch.randn(inn, r, generator=g)
    G, pref = torch.randn(r, r, K, generator=g), torch.tensor([0.3, 0.7])
    A, B = torch.randn(K, out, R, generator=g), torch.randn(K, inn, R, generator=g)
    good = pmkernels.low_rank_delta_sq(A, B)
    want = pmkernels.low_rank_distances(U, G, V, pref, A, B)
    assert torch.allclose(pmkernels.low_rank_distances(U, G, V, pref, A, B, delta_sq=good), want)
    for bad, msg in ((good * torch.tensor([1.0, -1.0]), ">= 0"), (torch.tensor([float("nan"), 1.0]), "finite"),
                     (torch.tensor([0.0, 1.0]), r"delta_sq\[0\] is 0 but")):
        with pytest.raises(ValueError, match=msg):
            pmkernels.low_rank_distances(U, G, V, pref, A, B, delta_sq=bad)
    A0 = A.clone()
    A0[0] = 0  # a zero delta has delta_sq 0
    z = pmkernels.low_rank_delta_sq(A0, B)
    assert z[0] == 0
    pmkernels.low_rank_distances(U, G, V, pref, A0, B, delta_sq=z)


def test_from_compressed_refuses_nan_factors(tmp_path):
    from paretomerge.pools import ModelPool
    from paretomerge.pools.compress import CompressedTaskVectors
    from helpers import Tiny

    torch.manual_seed(0)
    base = Tiny()
    fts = {t: Tiny() for t in ("a", "b")}
    ctv = ModelPool.from_modules(base, fts).compress(rank=2)
    key = next(iter(ctv.factors["b"]))
    ctv.factors["b"][key].A[0, 0] = float("nan")
    ctv.save(tmp_path / "c.safetensors")
    for src in (ctv, tmp_path / "c.safetensors"):
        with pytest.raises(ValueError, match=f"task 'b': factor A of '{key}' must contain only finite"):
            ModelPool.from_compressed(base, src)
    assert isinstance(CompressedTaskVectors.load(tmp_path / "c.safetensors"), CompressedTaskVectors)


# ----------------------------------------------------------------------------- --fresh
def test_fresh_removes_the_earlier_result_before_training(tmp_path, monkeypatch):
    from paretomerge import program

    path = write_config(tmp_path, write_pool(tmp_path))
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    earlier = [out / "pareto_merged.pt", out / "report.json", out / "checkpoints" / "last.pt",
               out / "checkpoints" / "step000002.pt"]
    for f in earlier + [out / "notes.txt"]:
        f.write_bytes(b"an earlier run's")

    def killed(*a, **k):
        raise KeyboardInterrupt  # the fresh run dies before it writes its result

    monkeypatch.setattr(program, "_run_merge_locked", killed)
    assert main(["merge", "--config", str(path), "--fresh"]) == 128 + signal.SIGINT
    assert not any(f.exists() for f in earlier)  # was: the old pareto_merged.pt, looking like the new run's
    assert (out / "notes.txt").exists()  # not a run output: kept


# ----------------------------------------------------------------------------- MAP
def _front(points: np.ndarray):
    from paretomerge.methods.map import MapFront

    m = len(points)
    return MapFront(np.zeros((m, 2)), points, [], np.arange(m, dtype=float)[:, None].repeat(2, 1), points, m, 0.0,
                    0.0)


def test_map_tchebycheff_reaches_a_non_convex_front():
    """A front bending toward the origin (m1^½ + m2^½ = 1): a weighted sum of the metrics only ever picks the
    two ends; the Tchebycheff rule picks every point for some γ, and γ = e_k the best on task k."""
    t = np.linspace(0.0, 1.0, 21)
    points = np.stack([t, (1 - np.sqrt(t)) ** 2], 1)
    front = _front(points)
    grid = [np.array([a, 1 - a]) for a in np.linspace(0.0, 1.0, 401)]
    chosen = {int(front.select(g)[0]) for g in grid}
    assert chosen == set(range(len(points)))
    weighted_sum = {int(np.argmax(points @ g)) for g in grid}  # the old rule (metrics already in [0, 1])
    assert weighted_sum == {0, len(points) - 1}
    assert int(front.select([1.0, 0.0])[0]) == len(points) - 1 and int(front.select([0.0, 1.0])[0]) == 0
    # balanced γ on a symmetric front: the middle point (equal normalised gaps), not an end
    assert int(front.select([0.5, 0.5])[0]) == 5  # t = 0.25: m1 = m2 = 0.25


def test_map_surrogates_stay_in_the_accuracy_range():
    """An accuracy that jumps (a step at c_k = 0.5) fits a quadratic that leaves [0, 1] at the box's corners;
    MAP clips its predictions to the metric's range."""
    from paretomerge.methods.map import amortized_front

    def acc(c):
        return [0.1 + 0.85 * float(c[0] > 0.5) - 0.05 * c[1], 0.1 + 0.85 * float(c[1] > 0.5) - 0.05 * c[0]]

    raw = amortized_front(acc, 2, budget=16, n_gen=20, low=-1.0, high=2.0)
    clipped = amortized_front(acc, 2, budget=16, n_gen=20, low=-1.0, high=2.0, metric_range=(0.0, 1.0))
    wide = np.random.default_rng(0).uniform(-1.0, 2.0, size=(500, 2))
    unclipped = np.stack([s(wide) for s in raw.surrogates], 1)
    assert unclipped.min() < 0.0 or unclipped.max() > 1.0  # the quadratic does leave [0, 1] here
    assert all(((s(wide) >= 0) & (s(wide) <= 1)).all() for s in clipped.surrogates)
    assert ((clipped.predicted >= 0) & (clipped.predicted <= 1)).all()
    with pytest.raises(ValueError, match="map.metric_range"):
        amortized_front(acc, 2, budget=8, metric_range=(1.0, 0.0))
