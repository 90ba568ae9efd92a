"""``python -m relaydiff.export``: export device components of a family and validate them against torch.

Example::

    python -m relaydiff.export --family out/tiny --exporter onnx --component unet_step --out out/export
    python -m relaydiff.export --family out/tiny --exporter coreml --option target=iOS17 --out out/export
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from relaydiff.core.errors import RelaydiffError


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"an option is KEY=VALUE, got {text!r}")
    low = value.lower()
    parsed: object = {"true": True, "false": False}.get(low, value)
    if isinstance(parsed, str) and value.isdigit():
        parsed = int(value)
    return key, parsed


def main(argv: Sequence[str] | None = None) -> int:
    from relaydiff.export import get_exporter, list_components, list_exporters
    from relaydiff.export.base import RuntimeUnavailableError

    parser = argparse.ArgumentParser(prog="python -m relaydiff.export", description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, type=Path, help="family or pipeline folder (local)")
    parser.add_argument("--variant", default=None, help="UNet variant (default: the family's device default)")
    parser.add_argument("--exporter", required=True, choices=list_exporters())
    parser.add_argument("--component", action="append", choices=list_components(),
                        help="component to export (repeatable; default: unet_step, vae_decoder, text_encoder)")
    parser.add_argument("--option", action="append", type=_option, default=[], help="exporter option KEY=VALUE")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--no-validate", action="store_true", help="export only")
    args = parser.parse_args(argv)
    try:
        exporter = get_exporter(args.exporter, **dict(args.option))
    except (TypeError, ValueError) as exc:  # an unknown option or a bad option value
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from relaydiff.core import family
        from relaydiff.export import get_component

        model = family.load(family.resolve(args.family, args.variant, role="device"))
        for name in args.component or ["unet_step", "vae_decoder", "text_encoder"]:
            artifact = exporter.export(get_component(name), model, args.out)
            print(f"wrote {artifact.path} ({artifact.metadata['export_seconds']:.1f} s)")
            if args.no_validate:
                continue
            try:
                print(exporter.validate(artifact, model))
            except RuntimeUnavailableError as exc:
                exporter.check_spec(artifact)
                print(f"spec of {artifact.path.name} checked; not run: {exc}")
    except RelaydiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
