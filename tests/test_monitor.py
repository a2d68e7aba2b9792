"""The run report of the Prefect UI stays small at any collection size, and the progress
artifact ends at 100 % whatever order many threads report in."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from flows import monitor


def _rows(tmp_path: Path, n: int, failed: int) -> list[dict[str, object]]:
    preview = tmp_path / "p.png"
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(preview)
    rows: list[dict[str, object]] = [
        {"image": f"bad{i}", "status": "failed", "error": f"bad{i}.tif: not a TIFF"}
        for i in range(failed)
    ]
    rows += [
        {"image": f"im{i}", "status": "done", "preview": str(preview), "objects": 3}
        for i in range(n)
    ]
    return rows


def test_report_embeds_a_bounded_number_of_previews_and_every_failure(tmp_path: Path) -> None:
    text = monitor.report(_rows(tmp_path, 10_000, 3), "run", "totals")
    assert text.count("data:image/png;base64,") == monitor.PREVIEWS
    assert "… and 9988 more image(s)" in text
    for i in range(3):
        assert f"## bad{i} — failed\nError: bad{i}.tif: not a TIFF" in text
    assert len(text) < 200_000  # the markdown artifact of 10,000 images


def test_report_of_a_few_images_shows_them_all(tmp_path: Path) -> None:
    text = monitor.report(_rows(tmp_path, 2, 0), "run", "totals")
    assert text.count("data:image/png;base64,") == 2 and "more image" not in text


def test_progress_from_many_threads_ends_at_100(
    prefect_api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against the test session's real Prefect API; the sends are recorded on their way."""
    from prefect.settings import PREFECT_API_URL

    sent: list[float] = []
    real = monitor.update_progress_artifact

    def recorded(artifact_id: object, *, progress: float, description: str) -> None:
        sent.append(progress)
        real(artifact_id, progress=progress, description=description)

    monkeypatch.setattr(monitor, "update_progress_artifact", recorded)
    monkeypatch.setattr(monitor, "INTERVAL", 0.0)
    progress = monitor.RunProgress(200, 200, key="test-progress")
    threads = [
        threading.Thread(target=lambda k=k: [progress.image_done(f"{k}-{i}", 1) for i in range(50)])
        for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress.close()
    assert sent[-1] == 100.0
    assert sent == sorted(sent)  # never an older value after a newer one
    stored = httpx.get(f"{PREFECT_API_URL.value()}/artifacts/{progress.artifact_id}").json()
    assert stored["data"] == 100.0
    assert stored["description"].startswith("images 200/200 done")


def test_thumbnails_made_as_images_finish_are_looked_up(tmp_path: Path) -> None:
    from segpipe.io import png
    from segpipe.preview import PALETTE

    previews = []
    picture = (np.arange(640 * 480).reshape(480, 640) % 256).astype(np.uint8)
    for name in ("a", "b"):
        path = tmp_path / f"{name}.png"
        path.write_bytes(png.encode(picture, PALETTE))
        previews.append(str(path))
    thumbnails = monitor.Thumbnails(["a"])
    thumbnails.make("a", [previews[0]])
    thumbnails.make("b", [previews[1]])  # not one the report embeds: nothing made
    for p in previews:
        Path(p).unlink()
    uri = thumbnails.get(previews[0])
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as thumb:
        assert thumb.size == (monitor.THUMBNAIL, 240)
    assert thumbnails.get(previews[1]) == ""  # made only when asked, and it is gone
