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


def test_report_lists_a_bounded_number_of_images_and_every_failure(tmp_path: Path) -> None:
    text = monitor.report(_rows(tmp_path, 10_000, 3), "run", "totals")
    assert "data:image" not in text  # the pictures are in the previews artifact
    assert "`segpipe-previews` artifact" in text
    assert text.count("## im") == monitor.PREVIEWS
    assert "… and 9988 more image(s)" in text
    for i in range(3):
        assert f"## bad{i} — failed\nError: bad{i}.tif: not a TIFF" in text
    assert len(text) < 200_000  # the markdown artifact of 10,000 images


def test_report_of_a_few_images_shows_them_all(tmp_path: Path) -> None:
    text = monitor.report(_rows(tmp_path, 2, 0), "run", "totals")
    assert text.count("## im") == 2 and "more image" not in text


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


def _previews(tmp_path: Path, names: list[str]) -> list[str]:
    from segpipe.io import png
    from segpipe.preview import PALETTE

    picture = (np.arange(640 * 480).reshape(480, 640) % 256).astype(np.uint8)
    paths = []
    for name in names:
        path = tmp_path / f"{name}.png"
        path.write_bytes(png.encode(picture, PALETTE))
        paths.append(str(path))
    return paths


def _pictures(markdown: str) -> list[tuple[int, int]]:
    sizes = []
    for uri in markdown.split("](data:image/png;base64,")[1:]:
        with Image.open(io.BytesIO(base64.b64decode(uri.split(")", 1)[0]))) as thumb:
            sizes.append(thumb.size)
    return sizes


def test_previews_are_made_as_images_end_and_ready_when_all_have(tmp_path: Path) -> None:
    a, b, c = _previews(tmp_path, ["a", "b", "c"])
    thumbnails = monitor.Thumbnails(["a", "b", "gone"])
    thumbnails.make("a", [a], objects=5)
    thumbnails.make("c", [c], objects=7)  # not one the artifact shows: nothing made
    assert not thumbnails.ready()
    thumbnails.make("gone", None)  # it failed
    assert not thumbnails.ready()
    thumbnails.make("b", [b], objects=6)
    assert thumbnails.ready()
    for path in (a, b, c):
        Path(path).unlink()  # made already: the files are not read again
    markdown = thumbnails.markdown("run")
    assert markdown is not None
    assert _pictures(markdown) == [(monitor.THUMBNAIL, 240)] * 2
    assert markdown.index("## a") < markdown.index("## b") and "## gone" not in markdown
    assert "5 objects" in markdown and "6 objects" in markdown and "## c" not in markdown


def test_previews_of_a_run_whose_images_all_failed_are_not_sent() -> None:
    thumbnails = monitor.Thumbnails(["a"])
    thumbnails.make("a", None)
    assert thumbnails.ready() and thumbnails.markdown("run") is None
    sent: list[object] = []

    class Recorded(monitor.Reach):
        def __call__(self, fn: object, *args: object, **kwargs: object) -> None:
            sent.append(fn)

    thumbnails.send("run", Recorded())
    assert thumbnails.sent and not thumbnails.ready() and sent == []


def test_previews_are_sent_once_as_soon_as_ready(prefect_api: None, tmp_path: Path) -> None:
    """Against the test session's real Prefect API."""
    from prefect import flow
    from prefect.settings import PREFECT_API_URL

    (a,) = _previews(tmp_path, ["a"])

    @flow
    def run() -> str:
        from prefect.runtime import flow_run

        thumbnails = monitor.Thumbnails(["a"])
        thumbnails.make("a", [a], objects=3)
        reach = monitor.Reach()
        thumbnails.send("run", reach)
        thumbnails.send("run", reach)  # a second send: nothing
        assert reach.lost is None
        return str(flow_run.get_id())

    run_id = run()
    found = httpx.post(
        f"{PREFECT_API_URL.value()}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [run_id]}}},
        timeout=10,
    ).json()
    assert [x["key"] for x in found] == ["segpipe-previews"]
    assert _pictures(found[0]["data"]) == [(monitor.THUMBNAIL, 240)]
