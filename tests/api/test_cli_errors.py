"""Which failures the CLI reports in one line (exit 2: bad flags, files, checkpoints, pools) and which keep their
traceback (bugs); program parameter names reported as flags."""
from __future__ import annotations

import pytest

from _pool_files import write_config, write_pool
from helpers import good_config as _good
from paretomerge import plan
from paretomerge.cli import main


@pytest.mark.parametrize("bug", [lambda: {}["missing key"], lambda: int("not a number"),
                                 lambda: sorted([1, "a"])], ids=["KeyError", "ValueError", "TypeError"])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, bug):
    """A KeyError/ValueError/TypeError the library did not raise itself (a failing lookup or conversion) is a
    bug: it propagates out of main (traceback, non-2 exit) instead of becoming a one-line error."""
    path = write_config(tmp_path, write_pool(tmp_path))

    def broken(cfg, lowrank_R=None):
        bug()

    monkeypatch.setattr(plan, "plan_for_config", broken)
    with pytest.raises((KeyError, ValueError, TypeError)):
        main(["plan", str(path)])


def test_a_library_input_check_is_one_line(tmp_path, capsys):
    path = write_config(tmp_path, write_pool(tmp_path))
    assert main(["plan", str(path), "--lowrank-rank", "0"]) == 2
    assert capsys.readouterr().err.strip() == "paretomerge plan: error: lowrank_R must be an int >= 1, got 0"


def test_program_parameter_names_become_flags():
    """program.py and serve.py start errors with their parameter's name; the CLI reports the flag."""
    from paretomerge.cli import _with_flag_names

    assert _with_flag_names("pref has 3 entries") == "--pref has 3 entries"
    assert _with_flag_names("fmt hf writes one model: give one preference, got 2") == \
        "--format hf writes one model: give one preference, got 2"
    assert _with_flag_names("out_dir: 'x' already exists") == "--out: 'x' already exists"
    assert _with_flag_names("host/port: cannot listen") == "--host/--port: cannot listen"
    assert _with_flag_names("the device of pref must be") == "the device of pref must be"  # only a leading name
    assert _with_flag_names("preference is bad") == "preference is bad"


def test_cli_pref_must_be_finite(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["export", "--checkpoint", "x.pt", "--pref", "nan,0,0,1", "--out", "m.safetensors"])
    assert ei.value.code == 2
    assert "finite" in capsys.readouterr().err


def test_cli_export_out_must_be_a_file(tmp_path, capsys):
    assert main(["export", "--checkpoint", "x.pt", "--pref", "0.5,0.5", "--out", str(tmp_path) + "/"]) == 2
    assert "directory" in capsys.readouterr().err


def test_cli_eval_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(SystemExit) as ei:
        main(["eval", "--checkpoint", "c.pt", "--config", "c.yaml", "--out", str(f)])
    assert ei.value.code == 2 and "existing file" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_cli_bad_checkpoint_is_one_line(tmp_path, capsys, content):
    ck = tmp_path / "bad.pt"
    ck.write_bytes(content)
    rc = main(["export", "--checkpoint", str(ck), "--pref", "0.5,0.5", "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and str(ck) in err and len(err.strip().splitlines()) == 1, err


def test_cli_corrupt_safetensors_in_pool_is_one_line(tmp_path, capsys):
    import yaml

    d = _good()
    d["mode"] = "datafree"
    del d["unlabeled"]
    for name in ("p", "a", "b", "ha", "hb"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    rc = main(["merge", "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "safetensors" in err and len(err.strip().splitlines()) == 1, err
