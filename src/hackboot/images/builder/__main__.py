"""CLI: ``python -m hackboot.images.builder {tiny|debian-12|all} --out DIR [--force]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import BUILTIN_IMAGES, ImageBuildError, build_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hackboot.images.builder",
        description="Build Hackboot's built-in guest images (qcow2 + kernel + initrd + manifest).",
    )
    parser.add_argument("image", choices=[*BUILTIN_IMAGES, "all"])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    names = BUILTIN_IMAGES if args.image == "all" else (args.image,)
    for name in names:
        try:
            manifest = build_image(name, args.out, force=args.force)
        except ImageBuildError as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 1
        print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
