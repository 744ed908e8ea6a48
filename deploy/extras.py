"""Print the requirements of the given pyproject extras, one per line, with `lungcam[...]` expanded.

Used by the Dockerfile to install an image's dependencies before copying the source (layer caching).
"""

from __future__ import annotations

import re
import sys
import tomllib

SELF = re.compile(r"^lungcam\[(?P<extras>[^\]]+)\]$")


def requirements(project: dict, extras: list[str], seen: set[str] | None = None) -> list[str]:
    """The base dependencies plus every requirement of extras, self-references expanded, in order."""
    seen = set() if seen is None else seen
    out: list[str] = [] if seen else list(project["dependencies"])
    for extra in extras:
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in project["optional-dependencies"][extra]:
            match = SELF.match(requirement.replace(" ", ""))
            if match:
                out += requirements(project, match["extras"].split(","), seen)
            elif requirement not in out:
                out.append(requirement)
    return out


if __name__ == "__main__":
    with open("pyproject.toml", "rb") as handle:
        print("\n".join(requirements(tomllib.load(handle)["project"], sys.argv[1:])))
