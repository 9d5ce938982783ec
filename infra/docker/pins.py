#!/usr/bin/env python3
"""Print requirement lines taken from the project's pyproject.toml, so image builds never repeat a version.

pyproject.toml is the only place where versions live. The image definitions (infra/docker/Dockerfile,
infra/mlflow/Dockerfile) call this script instead of writing `torch==...` or `mlflow==...` themselves.

Usage:
    python pins.py [--pyproject PATH] --pinned NAME [--pinned NAME ...] [--or-bare NAME ...]

    --pinned NAME   print the dependency NAME exactly as pyproject declares it; it must be there and pinned
                    with `==` (exit 1 otherwise, naming the package and what was found).
    --or-bare NAME  print pyproject's declaration when NAME is a dependency there, else NAME itself
                    (for helper packages the project does not depend on, e.g. psycopg2-binary in the
                    MLflow server image).

Names are compared after PEP 503 normalisation (case, `-`, `_`, `.`); extras in the declaration are kept.
Only the standard library is used: the MLflow image runs this before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name: 'Smart_Open' -> 'smart-open'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def dependencies(pyproject: Path) -> dict[str, str]:
    """Map canonical name -> requirement string of `[project].dependencies` (optional extras not included)."""
    with open(pyproject, "rb") as f:
        data = tomllib.load(f)
    out: dict[str, str] = {}
    for req in data.get("project", {}).get("dependencies", []):
        m = _NAME.match(req)
        if m is None:
            raise ValueError(f"{pyproject}: cannot read a package name from dependency {req!r}")
        out[canonical(m.group(1))] = req.strip()
    return out


def requirement_lines(pyproject: Path, pinned: list[str], or_bare: list[str]) -> list[str]:
    """The lines to hand to pip; exits 1 with a one-line reason when a --pinned name is not pinned."""
    deps = dependencies(pyproject)
    lines: list[str] = []
    for name in pinned:
        req = deps.get(canonical(name))
        if req is None:
            raise SystemExit(f"pins.py: {name!r} is not a dependency in {pyproject}; add it there with '=='")
        if "==" not in req:
            raise SystemExit(f"pins.py: {name!r} must be pinned with '==' in {pyproject}, found {req!r}")
        lines.append(req)
    for name in or_bare:
        lines.append(deps.get(canonical(re.split(r"[\[<>=!~; ]", name, maxsplit=1)[0]), name))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    ap.add_argument("--pinned", action="append", default=[], metavar="NAME")
    ap.add_argument("--or-bare", action="append", default=[], metavar="NAME")
    args = ap.parse_args(argv)
    if not args.pinned and not args.or_bare:
        ap.error("give at least one --pinned or --or-bare NAME")
    print("\n".join(requirement_lines(args.pyproject, args.pinned, args.or_bare)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
