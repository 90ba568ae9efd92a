"""``relaydiff export``: export device components of a family and validate them against torch.

Example::

    relaydiff export --family out/tiny --exporter onnx --component unet_step --out out/export
    relaydiff export --family out/tiny --exporter coreml --option target=iOS17 --out out/export

Exit status 1 when an export fails its validation against torch, 2 on bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from relaydiff.cli.output import result
from relaydiff.core.errors import RelaydiffError

EXPORTERS = ("onnx", "coreml", "executorch")  # relaydiff.export's registry (imported lazily; checked in cmd_export)
COMPONENTS = ("unet_step", "vae_decoder", "text_encoder")


class GateFailed(RelaydiffError):
    """An export did not pass its check against torch (exit status 1)."""

    exit_code = 1


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"an option is KEY=VALUE, got {text!r}")
    low = value.lower()
    parsed: object = {"true": True, "false": False}.get(low, value)
    if isinstance(parsed, str) and value.isdigit():
        parsed = int(value)
    return key, parsed


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export device components of a family (one exporter) and validate them against torch")
    p.add_argument("--family", required=True, type=Path, help="family or pipeline folder (local)")
    p.add_argument("--variant", default=None, help="UNet variant (default: the family's device default)")
    p.add_argument("--exporter", required=True, choices=EXPORTERS, help="exporter")
    p.add_argument("--component", action="append", choices=COMPONENTS,
                   help="component to export (repeatable; default: unet_step, vae_decoder, text_encoder; on an SDXL- or "
                        "SD3-style family unet_step and vae_decoder: their text encoders are not exported yet)")
    p.add_argument("--option", action="append", type=_option, default=[],
                   help="exporter option KEY=VALUE (repeatable; default: the exporter's defaults)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--no-validate", action="store_true", help="export only")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from relaydiff.core import family
    from relaydiff.export import ValidationError, get_exporter
    from relaydiff.export.base import RuntimeUnavailableError
    from relaydiff.export.components import component_for

    try:
        exporter = get_exporter(args.exporter, **dict(args.option))
    except (TypeError, ValueError) as exc:  # an unknown option or a bad option value
        raise RelaydiffError(str(exc)) from None
    model = family.load(family.resolve(args.family, args.variant, role="device"))
    default = list(COMPONENTS) if model.style == "sd" else ["unet_step", "vae_decoder"]
    for name in args.component or default:  # unet_step in the form the model needs (student, SDXL, SD3)
        artifact = exporter.export(component_for(name, model), model, args.out)
        result(f"wrote {artifact.path} ({artifact.metadata['export_seconds']:.1f} s)")
        if args.no_validate:
            continue
        try:
            result(str(exporter.validate(artifact, model)))
        except RuntimeUnavailableError as exc:
            exporter.check_spec(artifact)
            result(f"spec of {artifact.path.name} checked; not run: {exc}")
        except ValidationError as exc:
            raise GateFailed(str(exc)) from None
    return 0
