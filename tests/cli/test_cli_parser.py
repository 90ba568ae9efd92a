"""The relaydiff parser: one subcommand per job, each with only its own flags, defaults in --help, --version."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from relaydiff import __version__
from relaydiff.cli import PASSTHROUGH, _leaves, build_parser, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"relaydiff {__version__}"


def _options(*path: str) -> set[str]:
    leaves = dict(_leaves(build_parser()))
    return {s for a in leaves[path]._actions for s in a.option_strings}


def test_every_command_is_a_real_subcommand() -> None:
    paths = {p for p, _ in _leaves(build_parser())}
    for path in [("eval", "relay"), ("eval", "scheduler"), ("eval", "distill"), ("quantize", "compare"),
                 ("quantize", "sensitivity"), ("family", "init"), ("family", "train"), ("family", "evaluate"),
                 ("bundle", "build"), ("bundle", "verify"), ("bench", "device"), ("bench", "link"), ("bench", "cluster"), ("cluster", "up"), ("relay",),
                 ("resume",), ("check",), ("host",), ("device",), ("export",), ("demo",), ("distill",)]:
        assert path in paths, path


def test_eval_subcommands_take_only_their_own_flags(capsys: pytest.CaptureFixture[str]) -> None:
    relay, scheduler, distill = _options("eval", "relay"), _options("eval", "scheduler"), _options("eval", "distill")
    assert "--requests" in scheduler and "--requests" not in relay and "--requests" not in distill
    assert "--variants" in distill and "--variants" not in relay
    assert "--host" in relay and "--host" not in scheduler
    with pytest.raises(SystemExit) as exc:
        main(["eval", "relay", "--requests", "5"])
    assert exc.value.code == 2 and "unrecognized arguments: --requests" in capsys.readouterr().err


def test_every_default_is_shown_in_help() -> None:
    """Each option with a default value says it (ours: 'default ...'; argparse's: '(default: X)')."""
    for path, leaf in _leaves(build_parser()):
        if " ".join(path) in PASSTHROUGH:
            continue
        formatter = leaf._get_formatter()
        for action in leaf._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.required:
                continue
            if action.default is None or action.default is False or not action.option_strings:
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert "default" in formatter._get_help_string(action).lower(), (path, action.option_strings, text)


def test_passthrough_commands_show_their_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["family", "evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "relaydiff family evaluate" in out and "--steps STEPS denoising steps (default: 25)" in out


@pytest.mark.parametrize("module", ["relaydiff.export", "relaydiff.quantize.compare", "relaydiff.quantize.sensitivity",
                                    "relaydiff.embedded.evaluate"])
def test_no_python_m_entry_points_for_users(module: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert "usage" not in proc.stdout.lower(), f"python -m {module} still has a command line"


def test_exit_2_for_bad_usage_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main(["family", "init", "--host", str(tmp_path / "h"), "--device", str(tmp_path / "d"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--host folder not found" in err and "Traceback" not in err


def test_an_unwritable_output_is_one_line(tiny_family, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the output folder should be
    code = main(["preset", "tiny", "--out", str(blocker / "sub"), "--json"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and str(blocker) in err
