"""The output store as a whole: which run owns it, which images are complete."""

from __future__ import annotations

import atexit
import datetime as dt
import errno
import getpass
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import zarr

from segpipe.errors import ConfigError, OutputConflictError, OutputLockedError, OutputWriteError

SCRATCH = "_segpipe"
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC)

KEY = "segpipe"
_MARK_LOCK = threading.Lock()


def attrs_section(group: zarr.Group, key: str) -> dict[str, Any]:
    """One top-level mapping of a group's attributes ({} if absent)."""
    value = group.attrs.asdict().get(key)
    return dict(value) if isinstance(value, dict) else {}


def check_name(root: str | Path, name: str, source: str) -> Path:
    """The image's folder in ``root``, refusing names that would land outside it or on
    segpipe's own folder.

    Raises
    ------
    ConfigError
        Naming the input whose name is unusable.
    """
    root_path = Path(root).resolve()
    target = (root_path / name).resolve()
    if (
        not name
        or name in (".", "..")
        or name.startswith(("_", "."))
        or os.sep in name
        or (os.altsep and os.altsep in name)
        or target.parent != root_path
    ):
        raise ConfigError(
            f"{source}: output name {name!r} is not a plain folder name inside {root_path}; "
            "rename the file."
        )
    return target


def fingerprint(settings: dict[str, Any]) -> str:
    """Stable hash of the settings that decide the output's pixels."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _has_images(root: Path) -> bool:
    return any(
        p.is_dir() and (p / "zarr.json").exists() and not p.name.startswith("_")
        for p in root.iterdir()
    )


def _wipe(root: Path, keep: Path) -> None:
    """Remove everything under ``root`` except ``keep`` (our lock)."""
    for p in root.iterdir():
        if p == keep.parent:
            for q in p.iterdir():
                if q != keep:
                    shutil.rmtree(q) if q.is_dir() else q.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def open_output(
    root: str | Path, run: dict[str, Any], *, overwrite: bool = False, resume: bool = False
) -> OutputLock:
    """Claim the output store for a run with these settings and lock it.

    Raises
    ------
    OutputConflictError
        If ``root`` holds another run's results (different settings) or
        something that is not a segpipe store, and ``overwrite`` is False; or
        an earlier run of the same settings and neither ``resume`` nor
        ``overwrite`` says what to do with it.
    OutputLockedError
        If another live run holds the store.
    """
    root = Path(root)
    fp = fingerprint(run)
    if root.exists() and not root.is_dir():
        raise OutputConflictError(f"{root}: output path exists and is not a directory.")
    lock = OutputLock(root)
    foreign = root.exists() and any(root.iterdir()) and _held(root) is None
    if foreign and not lock.path.exists() and not overwrite:
        # Someone else's folder: refuse before writing anything into it.
        raise OutputConflictError(
            f"{root}: output folder is not empty and is not a segpipe store; "
            "choose another output or pass --overwrite."
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock.acquire()  # before looking further: two runs racing see one winner
    except OSError as err:
        if isinstance(err, OutputLockedError) or err.errno not in _UNWRITABLE:
            raise
        raise OutputWriteError(f"{root}: output folder is not writable ({err.strerror}).") from err
    try:
        start_over = _check_contents(root, fp, overwrite=overwrite, resume=resume)
    except BaseException:
        lock.release()
        raise
    if start_over:
        _wipe(root, lock.path)
    group = zarr.open_group(str(root), mode="a", zarr_format=3)
    group.attrs[KEY] = {"fingerprint": fp, "run": run}
    return lock


def _held(root: Path) -> dict[str, Any] | None:
    """The segpipe attributes of the store at ``root``, or None if it is not one."""
    try:
        held = attrs_section(zarr.open_group(str(root), mode="r"), KEY)
    except Exception:  # not a Zarr group at all
        return None
    return held if "fingerprint" in held else None


def _check_contents(root: Path, fp: str, *, overwrite: bool, resume: bool) -> bool:
    """Whether the (locked) store must be emptied first; raise if it holds another run."""
    held = _held(root)
    if held is None:
        only_ours = all(p.name == SCRATCH for p in root.iterdir())
        if not only_ours and not overwrite:
            raise OutputConflictError(
                f"{root}: output folder is not empty and is not a segpipe store; "
                "choose another output or pass --overwrite."
            )
        return not only_ours
    if held["fingerprint"] != fp:
        if not overwrite:
            seg = held.get("run", {}).get("segmenter", "?")
            raise OutputConflictError(
                f"{root}: output already holds a different run (segmenter {seg!r}, "
                f"fingerprint {held['fingerprint']}); choose another output or pass --overwrite."
            )
        return True
    if overwrite:
        return True
    if not resume and _has_images(root):
        raise OutputConflictError(
            f"{root}: output holds an earlier run with these settings; pass --resume to "
            "continue it (finished images and blocks are kept) or --overwrite to start over."
        )
    return False


class OutputLock:
    """An exclusive claim on an output store, naming its holder.

    The lock file is created with O_EXCL; a lock left by a dead process on
    this host is taken over. Acquiring again from the holding process is a
    no-op (the CLI checks, then the flow runs, in one process).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / SCRATCH / "lock.json"

    @staticmethod
    def _me() -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": getpass.getuser(),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }

    def holder(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _ours(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:
            return False
        return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if self._ours(holder):
                    return
                if (
                    holder
                    and holder.get("host") == socket.gethostname()
                    and not _alive(int(holder.get("pid", -1)))
                ):
                    self.path.unlink(missing_ok=True)  # its run died: take over
                    continue
                who = (
                    f"{holder.get('user')}@{holder.get('host')} pid {holder.get('pid')} since "
                    f"{holder.get('started')} ({holder.get('command')})"
                    if holder
                    else "an unknown process"
                )
                raise OutputLockedError(
                    f"{self.root}: in use by another run: {who}. Wait for it to end, or remove "
                    f"{self.path} if that run is gone."
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self._me(), fh)
            atexit.register(self.release)
            return
        raise OutputLockedError(f"{self.root}: could not take the lock {self.path}.")

    def release(self) -> None:
        if self._ours(self.holder()):
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_image(image_path: str | Path, **state: Any) -> None:
    """Update an image group's segpipe attributes (``complete`` is written last).

    Read, update, write under a lock: the preview and the tables record
    themselves from two threads of one process."""
    with _MARK_LOCK:
        group = zarr.open_group(str(image_path), mode="a", zarr_format=3)
        current: dict[str, Any] = attrs_section(group, KEY)
        current.update(state)
        group.attrs[KEY] = current


def image_state(image_path: str | Path) -> dict[str, Any]:
    """segpipe attributes of an image group ({} if absent)."""
    try:
        group = zarr.open_group(str(image_path), mode="r")
    except Exception:
        return {}
    return attrs_section(group, KEY)
