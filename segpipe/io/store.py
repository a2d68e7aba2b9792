"""The output store as a whole: which run owns it, which images are complete."""

from __future__ import annotations

import atexit
import contextlib
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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import zarr

from segpipe.errors import ConfigError, OutputConflictError, OutputLockedError, OutputWriteError
from segpipe.io import attrs, plate, storage
from segpipe.io.storage import Location, Where

SCRATCH = "_segpipe"
STORE_MARK = "store.json"  # OUT/_segpipe/store.json: this store was made by segpipe
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC)

KEY = "segpipe"
_MARK_LOCK = threading.Lock()


def attrs_section(group: zarr.Group, key: str) -> dict[str, Any]:
    """One top-level mapping of a group's attributes ({} if absent)."""
    value = group.attrs.asdict().get(key)
    return dict(value) if isinstance(value, dict) else {}


COLLECTION = "OME"
"""The group of the store's root that lists its images (NGFF ``bioformats2raw.layout``:
`segpipe.io.omezarr.write_collection`); no image may take its name."""


def check_name(root: Where, name: str, source: str) -> Location:
    """The image's folder in ``root``, refusing names that would land outside it, on
    segpipe's own folder or on the collection's (`COLLECTION`).

    A name is one plain folder name, or a plate field's ``ROW/COLUMN/FIELD``
    (`segpipe.io.plate`), each part plain.

    Raises
    ------
    ConfigError
        Naming the input whose name is unusable.
    """
    root_path = storage.location(root)
    remote = not isinstance(root_path, Path)
    if isinstance(root_path, Path):
        root_path = root_path.resolve()
    parts = name.split("/")
    target = root_path / name if remote else (root_path / name).resolve()
    if (
        not name
        or len(parts) not in (1, plate.DEPTH)
        or any(p in ("", ".", "..") or p.startswith(("_", ".")) for p in parts)
        or (os.sep != "/" and os.sep in name)
        or (os.altsep and os.altsep in name)
        or (not remote and target.parents[len(parts) - 1] != root_path)
    ):
        raise ConfigError(
            f"{source}: output name {name!r} is not a plain folder name inside {root_path}; "
            "rename the file."
        )
    if parts[0] == COLLECTION:
        raise ConfigError(
            f"{source}: output name {name!r} is the group listing the store's images "
            f"({root_path / COLLECTION}); rename the file."
        )
    return target


CONTAINER = "container"
"""segpipe's attribute of a plate's row and well groups it wrote (no image of its own)."""


def make_parents(root: Where, name: str) -> None:
    """Create the row and well groups above a plate field ``name``, marked as segpipe's.

    Raises
    ------
    OutputConflictError
        If one exists but segpipe did not write it (it is never written into).
    """
    parts = name.split("/")
    for depth, kind in zip(range(1, len(parts)), ("row", "well"), strict=False):
        group = storage.location(root).joinpath(*parts[:depth])
        if lexists(group) and not _written_by_us(group):
            raise OutputConflictError(
                f"{group}: exists but was not written by segpipe; it is left alone. Move "
                "it, or choose another output."
            )
        if not group.exists():
            attrs.update(group, {KEY: {CONTAINER: kind}})


def lexists(where: Location) -> bool:
    """Whether anything is at ``where`` (a local link too, even a broken one)."""
    return os.path.lexists(where) if isinstance(where, Path) else where.exists()


def _is_link(where: Location) -> bool:
    return isinstance(where, Path) and where.is_symlink()


def image_groups(root: Where) -> list[Location]:
    """The store's groups that may be images, sorted: its top-level folders (not
    segpipe's own ``_segpipe`` nor the `COLLECTION` list), and the fields inside the
    plate row and well groups segpipe wrote."""
    top = storage.location(root)
    if not top.is_dir():
        return []
    out: list[Location] = []

    def visit(folder: Location, depth: int) -> None:
        children = cast(Iterator[Location], folder.iterdir())
        for child in sorted(children, key=lambda c: c.name):
            if child.name.startswith(("_", ".")) or _is_link(child) or not child.is_dir():
                continue
            if depth == 0 and child.name == COLLECTION:
                continue
            if depth < plate.DEPTH - 1 and CONTAINER in image_state(child):
                visit(child, depth + 1)
            else:
                out.append(child)

    visit(top, 0)
    return out


def image_names(root: Where) -> dict[str, Location]:
    """`image_groups` by name (their path in the store, ``/``-separated)."""
    top = str(storage.location(root)).rstrip("/")
    return {str(g)[len(top) + 1 :]: g for g in image_groups(root)}


def fingerprint(settings: dict[str, Any]) -> str:
    """Stable hash of the settings that decide the output's pixels."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _has_images(root: Location) -> bool:
    return any(
        not p.name.startswith("_") and p.is_dir() and (p / "zarr.json").exists()
        for p in root.iterdir()
    )


def _written_by_us(group: Location) -> bool:
    """Whether ``group`` is a Zarr group carrying segpipe's attributes (an image it wrote)."""
    if _is_link(group):
        return False
    try:
        meta = json.loads(storage.read_bytes(group / "zarr.json"))
    except (OSError, ValueError):
        return False
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return isinstance(attrs, dict) and isinstance(attrs.get(KEY), dict)


def is_store(root: Where) -> bool:
    """Whether ``root`` is an output store segpipe created: its mark inside ``_segpipe/``,
    or (stores of earlier versions) segpipe's run fingerprint in the root's attributes."""
    where = storage.location(root)
    mark = where / SCRATCH / STORE_MARK
    return (mark.is_file() and not _is_link(mark)) or _held(where) is not None


def remove(path: Where, root: Where) -> None:
    """Delete ``path``, a file or folder segpipe wrote inside the store ``root``.

    Nothing is deleted through a symbolic link or outside ``root``; a missing path
    is fine.

    Raises
    ------
    OutputConflictError
        If ``path`` is a link, or lies outside the store.
    """
    if storage.is_url(str(root)):
        _remove_object(storage.location(path), storage.location(root))
        return
    path, root = Path(str(path)), Path(str(root))
    if not os.path.lexists(path):
        return
    real_root = root.resolve()
    inside = path.parent.resolve() / path.name
    if path.is_symlink() or not inside.is_relative_to(real_root) or inside == real_root:
        raise OutputConflictError(
            f"{path}: is a symbolic link or lies outside the output store {root}; segpipe "
            "deletes only what it wrote inside its store. Remove it yourself or choose "
            "another output."
        )
    if path.is_dir():
        shutil.rmtree(path)  # does not follow links inside (fd-based on Linux)
    else:
        path.unlink()


def _remove_object(where: Location, root: Location) -> None:
    """`remove` in object storage: no links there, so only the place is checked."""
    inside = str(where).rstrip("/")
    if not inside.startswith(str(root).rstrip("/") + "/"):
        raise OutputConflictError(
            f"{where}: lies outside the output store {root}; segpipe deletes only what it "
            "wrote inside its store."
        )
    storage.remove_tree(where)


def _wipe(root: Location, keep: Location) -> None:
    """Remove what segpipe wrote in ``root`` (the root's metadata, its image groups and
    ``_segpipe/`` but ``keep``, our lock); anything else there is left alone."""
    for p in root.iterdir():
        if p.name == SCRATCH:
            for q in p.iterdir():
                if str(q) != str(keep) and q.name != STORE_MARK:
                    remove(q, root)
        elif p.name == "zarr.json" or _written_by_us(p):
            remove(p, root)


def check_apart(source: str, root: Where) -> None:
    """Refuse an input that lies inside the output store ``root``, or holds it.

    Raises
    ------
    ConfigError
        Naming the input: the run would overwrite it, or read its own results.
    """
    if storage.is_url(source) or storage.is_url(str(root)):
        a, b = source.rstrip("/") + "/", str(root).rstrip("/") + "/"
        inside, holds = a.startswith(b), b.startswith(a)
    else:
        src, out = Path(source).resolve(), Path(str(root)).resolve()
        inside, holds = src.is_relative_to(out), out.is_relative_to(src)
    if inside:
        raise ConfigError(
            f"{source}: input lies inside the output store {root}; a run may replace what "
            "is there: copy the input elsewhere or choose another output."
        )
    if holds:
        raise ConfigError(
            f"{source}: the output store {root} lies inside this input; choose an output "
            "outside it."
        )


def _refuse_links(root: Location) -> None:
    if not isinstance(root, Path):
        return
    scratch = root / SCRATCH
    if scratch.is_symlink():
        raise OutputConflictError(
            f"{scratch}: is a symbolic link (to {os.readlink(scratch)}); segpipe keeps its "
            "markers and scratch inside the store and never writes or deletes through a "
            "link: remove the link or choose another output."
        )


def _not_ours(root: Location) -> OutputConflictError:
    return OutputConflictError(
        f"{root}: output folder is not empty and is not a segpipe store; segpipe writes "
        "only into a new or empty folder or a store it created: choose another output."
    )


def open_output(
    root: Where, run: dict[str, Any], *, overwrite: bool = False, resume: bool = False
) -> OutputLock:
    """Claim the output store for a run with these settings and lock it.

    A new store gets segpipe's mark (``_segpipe/store.json``); a folder without it
    (and without an earlier version's run fingerprint) is never written to or
    emptied, ``overwrite`` or not.

    Raises
    ------
    OutputConflictError
        If ``root`` is not a folder, holds something that is not a segpipe store,
        holds another run's results (different settings) and ``overwrite`` is False,
        or holds an earlier run of the same settings and neither ``resume`` nor
        ``overwrite`` says what to do with it.
    OutputLockedError
        If another live run holds the store.
    OutputWriteError
        If the folder cannot be created or written.
    """
    where = storage.location(root)
    fp = fingerprint(run)
    if isinstance(where, Path):
        for parent in (where, *where.parents):
            if parent.exists() and not parent.is_dir():
                which = "output path" if parent == where else f"{parent}, a parent of the output,"
                raise OutputConflictError(
                    f"{where}: {which} exists and is not a directory; choose another output."
                )
    else:
        storage.check_bucket(where)
        if where.is_file():  # an object may share its name with a prefix: not ours to use
            raise OutputConflictError(
                f"{where}: output path is an object, not a folder (prefix); choose another output."
            )
    _refuse_links(where)
    lock = OutputLock(where)
    exists = where.is_dir()
    in_making = exists and all(p.name == SCRATCH for p in where.iterdir())
    if exists and not in_making and not is_store(where):
        raise _not_ours(where)  # someone else's folder: refuse before writing anything
    try:
        if isinstance(where, Path):
            where.mkdir(parents=True, exist_ok=True)
        lock.acquire()  # before looking further: two runs racing see one winner
    except OSError as err:
        if isinstance(err, OutputLockedError) or err.errno not in _UNWRITABLE:
            raise
        raise OutputWriteError(f"{where}: output folder is not writable ({err.strerror}).") from err
    try:
        _refuse_links(where)
        start_over = _check_contents(where, fp, overwrite=overwrite, resume=resume)
        mark = where / SCRATCH / STORE_MARK
        if not mark.exists():
            write_json(mark, {"written_by": "segpipe", "created": _now()})
        if start_over:
            _wipe(where, lock.path)
        group = zarr.open_group(str(where), mode="a", zarr_format=3)
        group.attrs[KEY] = {"fingerprint": fp, "run": run}
    except BaseException:
        lock.release()
        raise
    return lock


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_json(path: Location, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically (temporary file, fsync, rename;
    one ``PUT`` in object storage), readable by its owner only."""
    if not isinstance(path, Path):
        storage.put(path, json.dumps(value).encode())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(value, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _held(root: Location) -> dict[str, Any] | None:
    """The segpipe attributes of the store at ``root``, or None if it is not one."""
    try:
        held = attrs_section(zarr.open_group(str(root), mode="r"), KEY)
    except Exception:  # not a Zarr group at all
        return None
    return held if "fingerprint" in held else None


def _check_contents(root: Location, fp: str, *, overwrite: bool, resume: bool) -> bool:
    """Whether the (locked) store must be emptied first; raise if it holds another run."""
    held = _held(root)
    if held is None:
        only_ours = all(p.name == SCRATCH for p in root.iterdir())
        if not only_ours and not is_store(root):
            raise _not_ours(root)
        return False
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

    The lock file is created with O_EXCL, a lock object in object storage with a
    conditional ``PUT`` (`segpipe.io.storage.create`): S3 applies writes to one key in
    order and refuses ``If-None-Match: *`` once the key exists, so of two runs only
    one creates it. A lock left by a dead process on this host is taken over.
    Acquiring again from the holding process is a no-op (the CLI checks, then the
    flow runs, in one process).
    """

    def __init__(self, root: Where | Location) -> None:
        self.root = storage.location(root)
        self.path = self.root / SCRATCH / "lock.json"

    @staticmethod
    def _me() -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": getpass.getuser(),
            "started": _now(),
            "command": " ".join(sys.argv)[:500],
        }

    def holder(self) -> dict[str, Any] | None:
        try:
            value = json.loads(storage.read_bytes(self.path))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _read_holder(self) -> dict[str, Any] | None:
        """`holder`, waiting up to a second for a lock file another run has just created
        and not yet written (its creation and its content are two steps)."""
        for _ in range(20):
            holder = self.holder()
            if holder is not None:
                return holder
            time.sleep(0.05)
        return None

    def _ours(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:
            return False
        return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()

    def acquire(self) -> None:
        for _ in range(2):
            if not storage.create(self.path, json.dumps(self._me()).encode()):
                holder = self._read_holder()
                if self._ours(holder):
                    return
                if (
                    holder
                    and holder.get("host") == socket.gethostname()
                    and not _alive(int(holder.get("pid", -1)))
                ):
                    storage.remove_tree(self.path)  # its run died: take over
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
            atexit.register(self._release_at_exit)
            return
        raise OutputLockedError(f"{self.root}: could not take the lock {self.path}.")

    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._ours(self.holder())

    def release(self) -> None:
        if self.held():
            storage.remove_tree(self.path)
        atexit.unregister(self._release_at_exit)

    def _release_at_exit(self) -> None:
        # A run that ends without releasing: best effort, as the interpreter may have shut
        # down what a store's client needs (Azure's thread pool); a lock left behind by a
        # dead process on this host is taken over by the next run.
        with contextlib.suppress(Exception):
            self.release()


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


def mark_image(image_path: Where, **state: Any) -> None:
    """Update an image group's segpipe attributes (``complete`` is written last).

    Read, update, write under a lock: the preview and the tables record
    themselves from two threads of one process."""
    with _MARK_LOCK:
        try:
            value = attrs.read(image_path).get(KEY)
        except FileNotFoundError:  # a new group
            value = None
        current: dict[str, Any] = dict(value) if isinstance(value, dict) else {}
        current.update(state)
        attrs.update(image_path, {KEY: current})


def image_state(image_path: Where) -> dict[str, Any]:
    """segpipe attributes of an image group ({} if absent)."""
    try:
        value = attrs.read(image_path).get(KEY)
    except Exception:  # no group there, or not one that parses
        return {}
    return dict(value) if isinstance(value, dict) else {}
