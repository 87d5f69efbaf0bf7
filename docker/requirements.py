"""Print the pinned requirements of one install extra of pyproject.toml, one per line.

The images install their dependencies from this list before the source is copied in, so a
code change rebuilds one thin layer instead of reinstalling torch. pyproject.toml stays the
only place a version is written.

    python docker/requirements.py service                          # base deps + service extra
    python docker/requirements.py worker --only torch torchvision  # just those two pins
    python docker/requirements.py worker --exclude torch torchvision
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _name(requirement: str) -> str:
    """PEP 503 normalised distribution name of a requirement string."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0]).lower()


def requirements(
    extra: str,
    pyproject: Path = PYPROJECT,
    only: list[str] | None = None,
    exclude: list[str] | None = None,
) -> list[str]:
    """The project's base dependencies plus those of ``extra``, optionally filtered by name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise SystemExit(f"unknown extra {extra!r}; pyproject.toml has {sorted(extras)}")
    reqs = list(project.get("dependencies", [])) + list(extras[extra])
    if only:
        wanted = {_name(n) for n in only}
        reqs = [r for r in reqs if _name(r) in wanted]
        missing = wanted - {_name(r) for r in reqs}
        if missing:
            raise SystemExit(f"not in the {extra!r} requirements: {sorted(missing)}")
    if exclude:
        dropped = {_name(n) for n in exclude}
        reqs = [r for r in reqs if _name(r) not in dropped]
    return reqs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME")
    parser.add_argument("--exclude", nargs="+", default=None, metavar="NAME")
    args = parser.parse_args(argv)
    sys.stdout.write("".join(r + "\n" for r in requirements(args.extra, only=args.only, exclude=args.exclude)))


if __name__ == "__main__":
    main()
