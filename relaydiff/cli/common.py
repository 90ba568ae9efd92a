"""What every command group shares: the parser class (every default shown in ``--help``) and common flags."""

from __future__ import annotations

import argparse
from typing import Any


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option's help that does not already say its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is False or default == argparse.SUPPRESS or action.required:
            return text
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        if isinstance(default, (list, tuple)):
            shown = ",".join(str(v) for v in default) if default else "none"
            return f"{text} (default: {shown})"
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose help shows defaults; subparsers inherit it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def add_json(p: argparse.ArgumentParser, what: str = "print one JSON document on stdout (library output goes to a log file)") -> None:
    p.add_argument("--json", action="store_true", help=what)


def add_pair_args(p: argparse.ArgumentParser) -> None:
    """--family, or --host and --device (a plain pipeline folder or a family folder each), and the variants."""
    p.add_argument("--family", help="family folder with host and device variants (default: the embedded family, "
                                    "when neither --host nor --device is given)")
    p.add_argument("--host", help="host model folder (pipeline or family folder); with --family: overrides its host "
                                  "(default: the --family's)")
    p.add_argument("--device", help="device model folder (pipeline or family folder); with --family: overrides its "
                                    "device (default: the --family's)")
    p.add_argument("--host-variant", help="family variant to use as host (default: the family's default_host)")
    p.add_argument("--device-variant", help="family variant to use as device (default: the family's default_device)")


def add_request_args(p: argparse.ArgumentParser, *, prompt: bool = True) -> None:
    """The generation request: prompt, steps, relay step, sampler, guidance, seed."""
    if prompt:
        p.add_argument("--prompt", required=True, help="text prompt")
        p.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance (default: none)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps N")
    if prompt:
        p.add_argument("--relay-step", type=int, default=None, help="hand-off step k in [0, N] (default: 30%% of N)")
    p.add_argument("--scheduler", default=None,
                   help="sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_sde, pndm, unipc; on a rectified-flow (SD3-style) "
                        "family flow_euler, flow_euler_sde, flow_dpmpp_2m (default: the model folder's own scheduler "
                        "where supported, else ddim, or flow_euler on a flow family)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")


def names(text: str) -> tuple[str, ...]:
    """A comma list as a tuple of stripped, non-empty names."""
    return tuple(n.strip() for n in text.split(",") if n.strip())
