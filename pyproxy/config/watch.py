"""Hot reload: notice when the ``--config`` paths change and reload.

Polling, not inotify: every ``interval`` seconds the watcher takes a *stat
signature* of everything the loader would read (the same file selection and
order: ``files.config_files``, shared with the loader), following symlinks. A file's entry is its
device, inode, size and mtime/ctime in nanoseconds, so an in-place edit
(size or mtime changes), an atomic replace (``os.replace``, new inode), a
file added to or removed from a directory, and a Kubernetes ConfigMap update
(the kubelet swaps the ``..data`` symlink; every visible ``name.yaml ->
..data/name.yaml`` now resolves to a new inode) all change the signature.
Polling works the same on every platform and on network and overlay file
systems, where inotify misses symlink swaps.

Bursts are debounced: after a change the watcher waits until the signature
has stayed the same for ``settle`` seconds (bounded by ``max_wait``), so an
editor's write-rename-chmod sequence or ``kubectl cp`` of several files
becomes one reload.

The signature the worker last loaded is recorded by the worker itself
(``Worker.config_signature``), taken *before* the files are read: a change
made while a reload is reading the files is seen on the next poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from .files import config_files

log = logging.getLogger("pyproxy.config")

Signature = tuple


def config_signature(paths: Sequence[str]) -> Signature:
    """A value that changes whenever any file the loader would read changes
    (the same selection: ``files.config_files``), or the load order does."""
    files, problems = config_files(paths)
    out: list[tuple] = [
        (f.path, f.stat.st_dev, f.stat.st_ino, f.stat.st_size, f.stat.st_mtime_ns, f.stat.st_ctime_ns)
        for f in files
    ]
    out.extend((p.path, p.kind) for p in problems)
    return tuple(out)


class ConfigWatcher:
    """Polls the config paths and calls ``reload`` after a settled change.

    ``current`` returns the signature of the config in force (the worker's
    ``config_signature``); the watcher never reloads for a signature equal to
    it, so a reload done for another reason (SIGHUP, ``POST /reload``) does
    not cause a second one.
    """

    def __init__(
        self,
        paths: Sequence[str],
        current: Callable[[], Signature | None],
        reload: Callable[[str], Awaitable[object]],
        loop: asyncio.AbstractEventLoop,
        interval: float = 0.5,
        settle: float = 0.2,
        max_wait: float = 3.0,
    ) -> None:
        self.paths = list(paths)
        self.current = current
        self.reload = reload
        self.loop = loop
        self.interval = interval
        self.settle = settle
        self.max_wait = max_wait
        self.polls = 0

    async def signature(self) -> Signature:
        # stat() calls can block on slow or network file systems: keep them
        # off the event loop.
        return await self.loop.run_in_executor(None, config_signature, self.paths)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must survive anything a file system does
                log.exception("config watcher: poll failed")

    async def check(self) -> bool:
        """One poll; returns True when a reload was triggered."""
        self.polls += 1
        sig = await self.signature()
        if sig == self.current():
            return False
        # Debounce: wait for the files to stop changing.
        waited = 0.0
        while waited < self.max_wait:
            await asyncio.sleep(self.settle)
            waited += self.settle
            again = await self.signature()
            if again == sig:
                break
            sig = again
        if sig == self.current():
            return False  # someone else (SIGHUP, /reload) already loaded it
        log.info("config change detected in %s: reloading", ", ".join(self.paths))
        await self.reload("file change")
        return True
