"""Which failures the CLI reports in one line (exit 2) and which keep their traceback (bugs)."""
from __future__ import annotations

import pytest

from _pool_files import write_config, write_pool
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
