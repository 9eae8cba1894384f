"""Which files a ``--config`` path list means, and in what order: the one
rule shared by the loader (what it reads), the config watcher (what it
watches) and the demo launcher.

Selection: a path that is a file is read as given; a directory contributes
its ``*.yaml``/``*.yml`` files (not recursive), skipping names that start
with "." (ConfigMap mounts keep their real files under ``..data``; the
visible names are symlinks, which are followed).

Order, like ``kubectl apply`` of the files in the order they were written:
by modification time, oldest first, then by path. The loader reads in this
order and a resource defined in several files is taken from the last one, so
the most recently modified file wins (with a warning naming both). A
ConfigMap update gives every file the same time: then the path decides.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

YAML_SUFFIXES = (".yaml", ".yml")


def is_config_name(name: str) -> bool:
    """A directory entry the loader reads (by name)."""
    return not name.startswith(".") and name.endswith(YAML_SUFFIXES)


@dataclass(frozen=True, slots=True)
class ConfigFile:
    path: str
    stat: os.stat_result  # of the file a symlink points to

    @property
    def order(self) -> tuple[int, str]:
        return (self.stat.st_mtime_ns, self.path)


@dataclass(frozen=True, slots=True)
class Problem:
    """A path that yields no file: (path, kind, detail), kind being
    ``missing``, ``not-regular`` or ``unlistable``."""

    path: str
    kind: str
    detail: str


def config_files(paths: Sequence[str]) -> tuple[list[ConfigFile], list[Problem]]:
    """The files ``paths`` mean, in load order, and the paths that yield none."""
    files: list[ConfigFile] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            problems.append(Problem(path, "missing", "no such file or directory"))
            continue
        if os.path.isdir(path):
            try:
                names = os.listdir(path)
            except OSError as exc:
                problems.append(Problem(path, "unlistable", f"cannot list directory: {exc.strerror or exc}"))
                continue
            for name in names:
                if not is_config_name(name):
                    continue
                full = os.path.join(path, name)
                try:
                    entry = os.stat(full)
                except OSError:
                    continue  # a dangling symlink, or removed meanwhile
                if _is_regular(entry):
                    files.append(ConfigFile(full, entry))
        elif _is_regular(st):
            files.append(ConfigFile(path, st))
        else:  # a FIFO or device would block or never end
            problems.append(Problem(path, "not-regular", "not a regular file or directory"))
    files.sort(key=lambda f: f.order)
    return files, problems


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)
