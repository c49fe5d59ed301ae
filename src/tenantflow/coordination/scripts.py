"""Lua scripts read from ``.lua`` files shipped in the package, each made whole once.

A script's file starts with a header comment: its KEYS and ARGV and its reply. A line
``-- include: <file>`` in that header puts another file of the same folder (helpers shared by
a family of scripts, with the key layout they share) before it. ``lua/prelude.lua`` of this
package comes first in every script: ``now_ms`` and the helpers all of them use are written
once. The SHA of the whole source is computed once; ``coordination.redis`` calls scripts by
it and loads them again, in one place, when the server no longer has them.

Pure Python (no driver): a module can name its scripts at import without ``redis`` installed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable

PRELUDE = ("tenantflow.coordination", "lua/prelude.lua")
_INCLUDE = re.compile(r"^-- include: (\S+\.lua)$")


@dataclass(frozen=True)
class Script:
    """One whole script: the prelude, its includes, its own file."""

    name: str
    source: str = field(repr=False)
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


def _read(package: str, path: str) -> str:
    return resources.files(package).joinpath(path).read_text(encoding="utf-8")


def includes(text: str) -> list[str]:
    """The files a script's header includes, in order (the header: its leading comments)."""
    found = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        match = _INCLUDE.match(line)
        if match:
            found.append(match.group(1))
    return found


class Scripts:
    """The scripts of one folder of a package, by name (the file name without ``.lua``),
    each read and hashed on first use, then kept."""

    def __init__(self, package: str, folder: str = "lua") -> None:
        self.package = package
        self.folder = folder
        self._loaded: dict[str, Script] = {}

    def __getitem__(self, name: str) -> Script:
        script = self._loaded.get(name)
        if script is None:
            own = _read(self.package, f"{self.folder}/{name}.lua")
            parts = [_read(*PRELUDE)]
            parts += [_read(self.package, f"{self.folder}/{inc}") for inc in includes(own)]
            script = self._loaded[name] = Script(name, "\n".join([*parts, own]))
        return script

    def names(self) -> list[str]:
        """Every script of the folder (the included files and the prelude are not scripts
        of their own, and are left out)."""
        folder = resources.files(self.package).joinpath(self.folder)
        files = {p.name for p in folder.iterdir() if p.name.endswith(".lua")}
        shared = {inc for name in files for inc in includes(_read_in(folder, name))}
        if self.package == PRELUDE[0]:
            shared.add(PRELUDE[1].rsplit("/", 1)[1])
        return sorted(name.removesuffix(".lua") for name in files - shared)


def _read_in(folder: Traversable, name: str) -> str:
    return folder.joinpath(name).read_text(encoding="utf-8")


# The coordination backend's own: locks, rate limits, breakers, bulkheads, sign-in counts.
SCRIPTS = Scripts("tenantflow.coordination")
