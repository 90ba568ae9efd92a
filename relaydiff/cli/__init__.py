"""The ``relaydiff`` command line: ``main(argv) -> int`` parses, builds a config and calls the library.

One module per command group, each with ``register(subparsers)`` setting ``func`` on its leaf parsers:
``relay`` (relay, resume, diagnose, check), ``family`` (init, train, evaluate), ``preset``, ``evaluation``
(eval relay, scheduler, distill), ``distill``, ``quantize`` (compare, sensitivity), ``export``, ``bundle`` (build, verify),
``bench`` (device, link, cluster), ``cluster`` (up), ``service`` (host, device) and ``demo``.

Exit status: 0 success, 1 a check or gate failed, 2 bad usage or input (one line on stderr, no traceback).
Library output (third-party warnings, ``[torch.onnx]`` prints, C++ logs) goes to a log file the command
names on stderr, or to stderr with ``--verbose``; under ``--json`` stdout holds exactly one JSON document.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from relaydiff import __version__
from relaydiff.cache import cli as cache
from relaydiff.cli import bench, bundle, cluster, demo, distill, evaluation, export, family, preset, preview, quantize, relay, service
from relaydiff.cli.common import Parser
from relaydiff.cli.output import capture, configure_logging, default_log_path, log_note, message
from relaydiff.core.errors import RelaydiffError

log = logging.getLogger(__name__)

GROUPS = (relay, family, preset, evaluation, distill, quantize, export, bundle, bench, cluster, demo, cache, preview)
PASSTHROUGH = {"family train", "family evaluate", "family probe"}  # long runs whose own prints are their output: nothing captured


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every leaf (sub)parser with its command path."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    out = []
    for action in subs:
        for name, child in action.choices.items():
            out += _leaves(child, (*path, name))
    return out


def build_parser() -> argparse.ArgumentParser:
    """The whole ``relaydiff`` parser (every leaf has --verbose and --log-file)."""
    parser = Parser(prog="relaydiff", description="Relay text-to-image diffusion from a host model to a device model.")
    parser.add_argument("--version", action="version", version=f"relaydiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    service.add_parsers(sub)  # relaydiff host, relaydiff device
    for name, func in service.COMMANDS.items():
        sub.choices[name].set_defaults(func=func)
    for path, leaf in _leaves(parser):
        if " ".join(path) in PASSTHROUGH:
            continue
        leaf.add_argument("--verbose", "-v", action="store_true",
                          help="show library output and DEBUG records on stderr instead of writing them to a log file")
        leaf.add_argument("--log-file", type=Path, default=None,
                          help="where library output goes (default: a new file under $RELAYDIFF_LOG_DIR or the temp folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``relaydiff`` console script. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if " ".join(argv[:2]) in PASSTHROUGH:  # their own parser reads every argument after the command, --help too
        argv = [*argv[:2], "--", *argv[2:]]
    args = build_parser().parse_args(argv)
    command = " ".join(str(getattr(args, k)) for k in ("command", "eval_command", "family_command", "quantize_command",
                                                         "bundle_command", "bench_command", "cluster_command", "cache_command",
                                                         "preview_command") if getattr(args, k, None))
    verbose = bool(getattr(args, "verbose", False))
    configure_logging(verbose=verbose, quiet=bool(getattr(args, "json", False)))
    if command in PASSTHROUGH:
        try:
            return _run(args)
        except _Failed as failed:
            message(f"relaydiff: error: {failed.text}")
            return failed.code
    log_path = None if verbose else (args.log_file or default_log_path(command.replace(" ", "-")))
    log.debug("relaydiff %s: %s", __version__, " ".join(argv))
    code, error = 2, None
    try:
        with capture(log_path, verbose=verbose, quiet=bool(getattr(args, "json", False))):
            code, error = _run(args), None
    except _Failed as failed:
        code, error = failed.code, failed.text
    note = log_note(log_path)
    if error is not None:
        one_line = "; ".join(part.strip() for part in error.splitlines() if part.strip())
        message(f"relaydiff: error: {one_line}" + (f" ({note})" if note else ""))
    elif note:
        message(f"relaydiff: {note}")
    return code


class _Failed(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


def _run(args: Any) -> int:
    try:
        return int(args.func(args))
    except RelaydiffError as exc:
        raise _Failed(int(getattr(exc, "exit_code", 2)), str(exc)) from None
    except OSError as exc:  # a file the user named cannot be read or written (permissions, a full disk, ...)
        raise _Failed(2, f"{exc.strerror or exc}: '{exc.filename}'" if exc.filename else str(exc)) from None
    except KeyboardInterrupt:
        raise _Failed(130, "interrupted") from None


if __name__ == "__main__":
    sys.exit(main())
