"""What a run shows in the Prefect UI: a progress artifact, a summary table, previews.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from segpipe.pipeline import STAGES

INTERVAL = 2.0  # seconds between progress updates sent to the API
THUMBNAIL = 320  # px: previews are embedded in the markdown artifact at this width


class RunProgress:
    """Percent of a collection run done: images finished plus the current image's
    stage (a Prefect task) and its block fraction, sent to a progress artifact."""

    def __init__(self, images: int, *, key: str = "segpipe-progress") -> None:
        self.images = max(images, 1)
        self.finished = 0
        self.stage = 0
        self.fraction = 0.0
        self.lock = threading.Lock()
        self.sent = -1.0
        self.last = 0.0
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=key, description=f"blocks done across {images} image(s)"
        )

    def percent(self) -> float:
        per_image = (self.stage + self.fraction) / len(STAGES)
        return round(100.0 * min((self.finished + per_image) / self.images, 1.0), 1)

    def enter(self, stage: str) -> None:
        """The current image has reached ``stage`` (one of `STAGES`)."""
        with self.lock:
            self.stage, self.fraction = STAGES.index(stage), 0.0
        self._send()

    def blocks(self, done: int, total: int) -> None:
        """Block progress inside the current stage (called for every finished block)."""
        with self.lock:
            self.fraction = done / total if total else 1.0
        self._send()

    def image_done(self) -> None:
        with self.lock:
            self.finished += 1
            self.stage, self.fraction = 0, 0.0
        self._send(force=True)

    def close(self) -> None:
        with self.lock:
            self.finished = self.images
        self._send(force=True)

    def _send(self, force: bool = False) -> None:
        now = time.monotonic()
        value = self.percent()
        if value == self.sent or (not force and now - self.last < INTERVAL):
            return
        self.sent, self.last = value, now
        update_progress_artifact(self.artifact_id, progress=value)


def totals(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Images processed, unchanged (skipped) and failed; objects, seconds, throughput."""
    done = [r for r in rows if r["status"] == "done"]
    seconds = sum(float(r["seconds"]) for r in done)
    pixels = sum(math.prod(int(v) for v in r["shape"].split("×")) for r in done if r["shape"])
    return {
        "images": len(rows),
        "processed": len(done),
        "unchanged": sum(r["status"] == "unchanged" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
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
    return (
        f"{t['images']} image(s): {t['processed']} processed, {t['unchanged']} unchanged, "
        f"{t['failed']} failed{how}; {t['objects']} objects in {t['seconds']} s, "
        f"{t['Mpx/s']} Mpx/s"
    )


def summary_artifacts(
    rows: Sequence[dict[str, Any]], *, title: str, mode: str = ""
) -> dict[str, Any]:
    """The summary table artifact and the markdown artifact with previews; returns totals."""
    t = totals(rows)
    line = totals_line(t, mode=mode)
    columns = ("image", "status", "shape", "objects", "seconds", "Mpx/s", "output", "error")
    create_table_artifact(
        key="segpipe-summary",
        table=[{c: r.get(c, "") for c in columns} for r in rows],
        description=f"{title}. {line}",
    )
    create_markdown_artifact(key="segpipe-report", markdown=report(rows, title, line))
    return t


def report(rows: Sequence[dict[str, Any]], title: str, line: str) -> str:
    """Markdown: the totals, then each image's preview (embedded) or why it has none."""
    parts = [f"# {title}", "", line, ""]
    for r in rows:
        parts.append(f"## {r['image']} — {r['status']}")
        if r.get("error"):
            parts.append(f"Error: {r['error']}")
        previews = [p for p in str(r.get("preview", "")).split(", ") if p]
        for p in previews:
            uri = _thumbnail(Path(p))
            if uri:
                parts.append(f"![{r['image']}]({uri})")
        if not previews and r["status"] != "failed":
            parts.append("(no preview)")
        if r.get("objects"):
            parts.append(f"{r['objects']} objects · {r.get('output', '')}")
        parts.append("")
    return "\n".join(parts)


def _thumbnail(path: Path) -> str:
    """A preview PNG scaled to `THUMBNAIL` px wide, as a data URI ('' if unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.thumbnail((THUMBNAIL, THUMBNAIL * 4), Image.Resampling.NEAREST)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
    except OSError:  # a missing preview leaves the row without a picture, not a failed run
        return ""
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
