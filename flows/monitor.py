"""What a run shows in the Prefect UI: a progress artifact, a previews artifact as soon as
the first images end, and at the end a summary table and a report.

Block progress reaches Prefect through one progress artifact per flow run,
updated at most every `INTERVAL` seconds (never once per block: a terabyte
run has millions), so the API sees a handful of calls per minute whatever
the block count.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast
from uuid import UUID

import httpx
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.exceptions import PrefectHTTPStatusError

from segpipe.io import storage
from segpipe.stages import names

NAMES = names()

INTERVAL = 2.0  # seconds between progress updates sent to the API
THUMBNAIL = 320  # px: previews are embedded in the previews artifact at this width
PREVIEWS = 12  # images the previews artifact shows: a 10,000-image run's stays small
LISTED = 1000  # failures the report lists one by one

API_ERRORS = (httpx.HTTPError, PrefectHTTPStatusError, OSError)
"""What a call to an unreachable or failing Prefect API raises."""


class Reach:
    """Calls to the Prefect API that a run can do without: an artifact that cannot be
    sent is noted (`lost`), not raised into the pipeline, and once one has failed the
    others are not tried (each would wait out Prefect's retries)."""

    def __init__(self) -> None:
        self.lost: BaseException | None = None

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or None if the API is, or turns out, unreachable."""
        if self.lost is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except API_ERRORS as err:
            self.lost = err
            return None


class RunProgress:
    """How far a collection run is: images done / total (and failed), blocks done / total,
    sent to one progress artifact and to the terminal's progress bar.

    An image's blocks count as done in proportion to the stages it has passed (and
    the blocks of the stage it is in), so the percentage moves smoothly whatever the
    mix of image sizes; many images are in flight at once.
    """

    def __init__(
        self,
        images: int,
        blocks: int,
        *,
        key: str = "segpipe-progress",
        report: Callable[[str, int, int], None] | None = None,
        reach: Reach | None = None,
    ) -> None:
        self.images = max(images, 1)
        self.blocks_total = max(blocks, 1)
        self.finished = 0
        self.failed = 0
        self.blocks_done = 0
        self.current: dict[str, tuple[int, float, int]] = {}  # image: (stage, fraction, blocks)
        self.report = report
        self.lock = threading.Lock()
        self.sending = threading.Lock()
        self.sent = -1.0
        self.last = 0.0
        self.reach = reach or Reach()
        # Prefect's sync-or-async decorator types it UUID | Coroutine; called here, a UUID
        self.artifact_id = cast(
            UUID | None,
            self.reach(
                create_progress_artifact, progress=0.0, key=key, description=self._description()
            ),
        )

    def _partial(self) -> float:
        """Blocks of the images in flight done, counting each stage passed."""
        return sum(b * (k + f) / len(NAMES) for k, f, b in self.current.values())

    def percent(self) -> float:
        done = (self.blocks_done + self._partial()) / self.blocks_total
        return round(100.0 * min(done, 1.0), 1)

    def _description(self) -> str:
        blocks = int(self.blocks_done + self._partial())
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"images {self.finished}/{self.images} done{failed}; "
            f"blocks {blocks}/{self.blocks_total} through every stage"
        )

    def update(self, image: str, blocks: int, stage: str, done: int, total: int) -> None:
        """``image`` (of ``blocks`` blocks) has ``done`` of ``total`` blocks of ``stage``."""
        with self.lock:
            k = NAMES.index(stage) if stage in NAMES else self.current.get(image, (0, 0, 0))[0]
            self.current[image] = (k, done / total if total else 1.0, blocks)
        self._send()

    def image_done(self, image: str, blocks: int, *, failed: bool = False) -> None:
        with self.lock:
            self.current.pop(image, None)
            self.finished += 1
            self.failed += failed
            self.blocks_done += blocks
        self._send()

    def close(self) -> None:
        with self.lock:
            self.current.clear()
            self.finished, self.blocks_done = self.images, self.blocks_total
        self._send(force=True)

    def _send(self, force: bool = False) -> None:
        with self.lock:
            if self.report is not None:
                self.report("images", self.finished, self.images)
                self.report("blocks", int(self.blocks_done + self._partial()), self.blocks_total)
        # Sends leave in the order their values are taken, or an older value could reach
        # the API after a newer one (a finished run showing 50 %). A routine update
        # skips while another is being sent, and is sent from a thread of its own: the
        # pipeline's threads never wait on the API (nor on Prefect's retries when it is
        # gone).
        if self.artifact_id is None or not self.sending.acquire(blocking=force):
            return
        if force:
            self._push(force=True)
        else:
            threading.Thread(target=self._push, name="segpipe-progress", daemon=True).start()

    def _push(self, force: bool = False) -> None:
        """Send the current value (`sending` held, released here)."""
        try:
            now = time.monotonic()
            with self.lock:
                value = self.percent()
                text = self._description()
                stale = value == self.sent or now - self.last < INTERVAL
                if value < self.sent or (stale and not force):
                    return
                self.sent, self.last = value, now
            self.reach(update_progress_artifact, self.artifact_id, progress=value, description=text)
        finally:
            self.sending.release()


def totals(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Images processed, unchanged (skipped) and failed, orphaned or pruned images (their
    input gone, not counted among the images); objects, seconds, throughput."""
    done = [r for r in rows if r["status"] in ("done", "repaired")]
    seconds = sum(float(r["seconds"]) for r in done)
    pixels = sum(math.prod(int(v) for v in r["shape"].split("×")) for r in done if r["shape"])
    return {
        "images": sum(r["status"] not in ("orphaned", "pruned") for r in rows),
        "processed": len(done),
        "unchanged": sum(r["status"] == "unchanged" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "orphaned": sum(r["status"] == "orphaned" for r in rows),
        "pruned": sum(r["status"] == "pruned" for r in rows),
        "objects": sum(int(r["objects"]) for r in done),
        "seconds": round(seconds, 2),
        "Mpx/s": round(pixels / 1e6 / seconds, 2) if seconds > 0 else 0.0,
    }


def run_mode(config: Any) -> str:
    """``full`` (every image recomputed), ``incremental`` (unchanged images skipped) or ``""``."""
    return "full" if config.full else "incremental" if config.resume else ""


def totals_line(t: dict[str, Any], *, mode: str = "") -> str:
    """``3 image(s): 2 processed, 1 unchanged, 0 failed (incremental…); …`` for logs and UIs."""
    how = {
        "full": " (full run: every image recomputed)",
        "incremental": " (incremental: only new or changed images)",
    }.get(mode, "")
    gone = "".join(f", {t[k]} {k} (input gone)" for k in ("orphaned", "pruned") if t.get(k))
    return (
        f"{t['images']} image(s): {t['processed']} processed, {t['unchanged']} unchanged, "
        f"{t['failed']} failed{how}{gone}; {t['objects']} objects in {t['seconds']} s, "
        f"{t['Mpx/s']} Mpx/s"
    )


class Thumbnails:
    """The previews artifact (``segpipe-previews``): the first `PREVIEWS` images'
    previews, made as each image finishes and sent as soon as all of them have, while
    the cluster is busy with the others; a night's run shows them within its first
    minutes, not at its end.

    Parameters
    ----------
    names : iterable of str
        The images whose previews the artifact shows, in order.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = list(dict.fromkeys(names))
        self._made: dict[str, tuple[list[str], int]] = {}  # name: (thumbnails, objects)
        self._ended: set[str] = set()
        self._sent = False
        self._lock = threading.Lock()

    def make(self, name: str, previews: Sequence[str] | None, objects: int = 0) -> None:
        """Image ``name`` ended: make the thumbnails of its ``previews`` now, if it is one
        of `names` (``previews`` None: it failed, and shows none)."""
        if name not in self.names:
            return
        made = None if previews is None else ([_thumbnail(p) for p in previews], objects)
        with self._lock:
            if made is not None:
                self._made[name] = made
            self._ended.add(name)

    @property
    def sent(self) -> bool:
        """Whether `send` was called."""
        with self._lock:
            return self._sent

    def ready(self) -> bool:
        """Whether every one of `names` has ended, and the artifact is not yet sent."""
        with self._lock:
            return not self._sent and self._ended.issuperset(self.names)

    def markdown(self, title: str) -> str | None:
        """The artifact's markdown; None when no image has a thumbnail."""
        with self._lock:
            made = [(n, *self._made[n]) for n in self.names if n in self._made]
        if not made:
            return None
        parts = [f"# Previews: {title}", ""]
        for name, uris, objects in made:
            parts.append(f"## {name}")
            parts += [f"![{name}]({uri})" for uri in uris if uri] or ["(no preview)"]
            parts += [f"{objects} objects", ""]
        return "\n".join(parts)

    def send(self, title: str, reach: Reach) -> None:
        """Send the artifact, once (through ``reach``), with the thumbnails made so far."""
        with self._lock:
            if self._sent:
                return
            self._sent = True
        markdown = self.markdown(title)
        if markdown is not None:
            reach(create_markdown_artifact, key="segpipe-previews", markdown=markdown)


def summary_artifacts(
    rows: Sequence[dict[str, Any]],
    *,
    title: str,
    mode: str = "",
    reach: Reach | None = None,
) -> dict[str, Any]:
    """The summary table artifact and the markdown report (through ``reach``: not sent
    when the API is unreachable); returns totals."""
    reach = reach or Reach()
    t = totals(rows)
    line = totals_line(t, mode=mode)
    columns = ("image", "status", "shape", "objects", "seconds", "Mpx/s", "output", "error")
    reach(
        create_table_artifact,
        key="segpipe-summary",
        table=[{c: r.get(c, "") for c in columns} for r in rows],
        description=f"{title}. {line}",
    )
    reach(create_markdown_artifact, key="segpipe-report", markdown=report(rows, title, line))
    return t


def report(rows: Sequence[dict[str, Any]], title: str, line: str) -> str:
    """Markdown: the totals, every failed or orphaned image (up to `LISTED`), then the
    first `PREVIEWS` others, whose pictures are in the previews artifact; the summary
    table lists every image."""
    parts = [f"# {title}", "", line, ""]
    noted = ("failed", "orphaned", "pruned")
    failed = [r for r in rows if r["status"] in noted]
    others = [r for r in rows if r["status"] not in noted]
    for r in failed[:LISTED]:
        why = "Error" if r["status"] == "failed" else "Note"
        parts += [
            f"## {r['image']} — {r['status']}",
            f"{why}: {r.get('error') or 'no message'}",
            "",
        ]
    if len(failed) > LISTED:
        parts += [f"… and {len(failed) - LISTED} more: see the summary table.", ""]
    if others:
        parts += [
            f"Previews of the first {min(len(others), PREVIEWS)} image(s): the "
            "`segpipe-previews` artifact; each image's own: `<output>/<image>/previews/`.",
            "",
        ]
    for r in others[:PREVIEWS]:
        parts.append(f"## {r['image']} — {r['status']}")
        if r.get("objects"):
            parts.append(f"{r['objects']} objects · {r.get('output', '')}")
        parts.append("")
    if len(others) > PREVIEWS:
        parts.append(f"… and {len(others) - PREVIEWS} more image(s): see the summary table.")
    return "\n".join(parts)


def _thumbnail(path: str) -> str:
    """A preview PNG scaled to `THUMBNAIL` px wide, as a data URI ('' if unreadable)."""
    from PIL import Image

    try:
        with storage.location(path).open("rb") as fh, Image.open(fh) as img:
            img.thumbnail((THUMBNAIL, THUMBNAIL * 4), Image.Resampling.NEAREST)
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=1)  # level 6 took 3x the decode
    except OSError:  # a missing preview leaves the row without a picture, not a failed run
        return ""
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
