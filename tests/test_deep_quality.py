"""The shipped default U-Net through the real pipeline (`segpipe run --segmenter unet`) on
held-out synthetic nuclei: PQ >= 0.90 against the ground truth, and better than the default
watershed run the same way on the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from segpipe import synthetic
from segpipe.deep.data import TRAIN_SEED_MIN
from segpipe.deep.train import VAL_SEED0, score_instances
from segpipe.evaluate import Metrics
from segpipe.segmenters.deep import WEIGHTS

pytestmark = pytest.mark.integration

# Seeds the training never drew (it draws from [TRAIN_SEED_MIN, 2**31)) and the model card's
# validation did not use (VAL_SEED0 onwards).
SEEDS = (20_000, 20_001)
SHAPE = (512, 640)  # several tiles of the pipeline, not a multiple of the network's 2**depth
TILE = "256"
assert max(SEEDS) < TRAIN_SEED_MIN and not VAL_SEED0 <= min(SEEDS) < VAL_SEED0 + 100


def _segment(run_cli, images: Path, out: Path, segmenter: str) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    result = run_cli(
        "--input", str(images), "--output", str(out), "--segmenter", segmenter, "--tile", TILE
    )
    assert result.exit_code == 0, result.output
    return [
        np.asarray(zarr.open_array(str(out / f"nuclei{s}" / "labels" / "instances" / "0"))[:])
        for s in SEEDS
    ]


def _nuclei(m: Metrics) -> float:
    pq = next(c for c in m.classes if c.thing).pq
    assert pq is not None
    return pq


@pytest.mark.slow  # the shipped network against watershed on held-out images
def test_default_unet_beats_watershed(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert (WEIGHTS / "unet.pt").is_file() and (WEIGHTS / "unet.json").is_file()
    images = tmp_path / "images"
    truths = []
    for s in SEEDS:
        synthetic.write_tiff(images / f"nuclei{s}.tif", SHAPE, tile=128, seed=s)
        truths.append(synthetic.render(tuple(slice(0, n) for n in SHAPE), seed=s)[1])
    unet = score_instances(_segment(run_cli, images, tmp_path / "unet.zarr", "unet"), truths)
    ws = score_instances(_segment(run_cli, images, tmp_path / "ws.zarr", "watershed"), truths)
    summary = (
        f"unet PQ {unet.pq:.3f} (nuclei {_nuclei(unet):.3f}), "
        f"watershed PQ {ws.pq:.3f} (nuclei {_nuclei(ws):.3f})"
    )
    print(summary)  # shown with pytest -s
    assert unet.pq is not None and ws.pq is not None
    assert unet.pq >= 0.90, summary
    assert _nuclei(unet) >= 0.90, summary  # the instances alone, not averaged with background
    assert unet.pq > ws.pq, summary
    assert _nuclei(unet) > _nuclei(ws), summary


@pytest.mark.slow  # four held-out sets through the shipped network and the watershed
def test_default_unet_beats_watershed_on_every_held_out_set() -> None:
    """Nuclei larger than any trained on, barely brighter than the background, or with
    fewer photons than any trained on: the shipped unet still finds them better than the
    watershed."""
    from segpipe.deep import checkpoint, synth
    from segpipe.deep.train import segment_image, watershed_image

    loaded = checkpoint.load(WEIGHTS / "unet.pt")
    net, meta = loaded.net.eval(), loaded.meta
    scores = {}
    for name in synth.HELD_OUT:
        data = synth.held_out_set(name, 2, (384, 384))
        truths = [t for _, t in data]
        unet = _nuclei(score_instances([segment_image(net, im, meta) for im, _ in data], truths))
        ws = _nuclei(score_instances([watershed_image(im) for im, _ in data], truths))
        scores[name] = (round(unet, 3), round(ws, 3))
    print(scores)  # shown with pytest -s
    assert all(unet > ws for unet, ws in scores.values()), scores
