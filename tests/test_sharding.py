"""Sharded outputs (Zarr v3 sharding, `RunConfig.viewer_chunk`): each block a shard of
inner chunks; the same arrays as unsharded and as whole-image scikit-image; shard files
written as zarr writes them, vouched for by markers and the manifest like chunk files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel
from skimage import filters, measure

from segpipe import synthetic
from segpipe.blocks import BlockGrid
from segpipe.io import omezarr
from tests.helpers import same_up_to_renumbering

LABELS = ("instances", "semantic", "panoptic")


def _reference(image: np.ndarray) -> np.ndarray:
    """Whole-image scikit-image: Gaussian σ 2, Otsu, connected components."""
    smooth = filters.gaussian(image.astype(np.float32), sigma=2, preserve_range=True)
    return measure.label(smooth > filters.threshold_otsu(smooth), connectivity=image.ndim)


def _codecs(array: Path) -> list[dict]:
    return json.loads((array / "zarr.json").read_text())["codecs"]


def _arrays(group: Path) -> list[Path]:
    """Every array of an image's group (image and label pyramids)."""
    return sorted(p.parent for p in group.rglob("zarr.json") if _is_array(p))


def _is_array(meta: Path) -> bool:
    return json.loads(meta.read_text())["node_type"] == "array"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write_tiff(tmp_path_factory.mktemp("in") / "img.tif", (300, 260), seed=3)


@pytest.fixture(scope="module")
def tall(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image of 3 pyramid levels: the third strided by its own tasks."""
    return synthetic.write_tiff(tmp_path_factory.mktemp("in") / "img.tif", (560, 300), seed=4)


@pytest.fixture(scope="module")
def runs(run_cli, tall: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same image sharded (inner chunks 32² in blocks of 128²) and unsharded."""
    out = {}
    for name, inner in (("sharded", "32"), ("plain", "0")):
        store = tmp_path_factory.mktemp(name) / "out.zarr"
        args = ("-i", str(tall), "-o", str(store), "--tile", "128", "--viewer-chunk", inner)
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
        out[name] = store
    return out


def test_sharded_arrays_equal_unsharded_and_the_reference(runs, tall: Path) -> None:
    sharded, plain = (zarr.open_group(str(runs[k] / "img"), mode="r") for k in ("sharded", "plain"))
    arrays = _arrays(runs["sharded"] / "img")
    assert len(arrays) == len(_arrays(runs["plain"] / "img")) == 12  # 4 pyramids of 3
    for path in arrays:
        key = str(path.relative_to(runs["sharded"] / "img"))
        np.testing.assert_array_equal(sharded[key][...], plain[key][...], err_msg=key)
    pixels = tifffile.imread(tall)
    ref = _reference(pixels)
    np.testing.assert_array_equal(sharded["0"][...], pixels)
    assert same_up_to_renumbering(sharded["labels/instances/0"][...], ref)
    np.testing.assert_array_equal(sharded["labels/semantic/0"][...], (ref > 0).astype(np.uint8))
    for key in ("0", "labels/instances/0"):
        assert sharded[key].attrs.asdict() == plain[key].attrs.asdict()


def test_result_arrays_are_shards_of_viewer_chunks_and_scratch_is_gone(runs) -> None:
    group = runs["sharded"] / "img"
    for path in (group / "0", *(group / "labels" / k / "0" for k in LABELS)):
        (codec,) = _codecs(path)
        assert codec["name"] == "sharding_indexed", path
        assert codec["configuration"]["chunk_shape"] == [32, 32]
        assert [c["name"] for c in codec["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
        arr = zarr.open_array(str(path), mode="r")
        assert arr.shards == (128, 128) and arr.chunks == (32, 32)
        # one file per block: 5 × 3 blocks of 128² over 560 × 300
        assert len([p for p in (path / "c").rglob("*") if p.is_file()]) == 15
    level1 = zarr.open_array(str(group / "labels" / "instances" / "1"), mode="r")
    assert (level1.shards, level1.chunks) == ((64, 64), (32, 32))  # the pass's half tiles
    level2 = zarr.open_array(str(group / "labels" / "instances" / "2"), mode="r")
    assert (level2.shards, level2.chunks) == ((128, 75), (32, 25))  # edges that divide 75
    for path in _arrays(runs["plain"] / "img"):
        assert _codecs(path)[0]["name"] == "bytes"
    assert not (runs["sharded"] / "_segpipe" / "scratch" / "img").exists()


def test_ome_zarr_models_validates_the_sharded_image(runs) -> None:
    group = zarr.open_group(str(runs["sharded"] / "img"), mode="r")
    Image.from_zarr(group)
    for name in LABELS:
        ImageLabel.from_zarr(group[f"labels/{name}"])


def test_a_damaged_shard_is_computed_again(run_cli, image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    args = ("-i", str(image), "-o", str(out), "--tile", "128", "--viewer-chunk", "32")
    assert run_cli(*args).exit_code == 0
    shard = out / "img" / "labels" / "instances" / "0" / "c" / "0" / "1"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit of an inner chunk: size and index unchanged
    shard.write_bytes(bytes(data))
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert "unchanged" not in result.output.split("Results")[0].split("img")[-1], result.output
    labels = zarr.open_array(str(out / "img" / "labels" / "instances" / "0"), mode="r")[...]
    assert same_up_to_renumbering(labels, _reference(tifffile.imread(image)))
    again = run_cli(*args, "--resume")
    assert again.exit_code == 0 and "unchanged" in again.output, again.output


def test_an_interrupted_image_recomputes_a_damaged_shard(client, image: Path, tmp_path) -> None:
    """A block's marker vouches for its shard file: deleted after the segment stage, the
    shard's block is computed again on resume, the others are kept."""
    from segpipe import image as segpipe_image
    from segpipe import lifecycle, pipeline, stages
    from segpipe.io.readers import open_source
    from segpipe.io.store import open_output
    from segpipe.segmenters import get_segmenter

    out = tmp_path / "out.zarr"
    open_output(out, {"test": 1}).release()
    spec = open_source(str(image))

    def plan() -> segpipe_image.ImagePlan:
        return segpipe_image.ImagePlan(
            spec, str(out), (128, 128), get_segmenter("otsu"), viewer_chunk=32
        )

    first = plan()
    assert lifecycle.begin(first) == "fresh"
    raw = stages.ingest.ingest(client, first)
    stats = stages.statistics.statistics(client, first, raw)
    stages.segment.segment(client, first, stats)  # then the run is "interrupted"
    semantic = out / "img" / "labels" / "semantic" / "0"
    assert _codecs(semantic)[0]["name"] == "sharding_indexed"
    (semantic / "c" / "1" / "0").unlink()
    result = pipeline.run_image(client, plan())
    assert result.objects == _reference(tifffile.imread(image)).max()
    tally = zarr.open_group(str(out / "img"), mode="r").attrs["segpipe"]["blocks"]
    assert tally["segment"]["computed"] == 1 < tally["segment"]["blocks"]
    assert _codecs(semantic)[0]["name"] == "sharding_indexed"  # kept, not re-created


def test_resuming_with_the_other_layout_is_refused(run_cli, image: Path, tmp_path) -> None:
    out = tmp_path / "out.zarr"
    args = ("-i", str(image), "-o", str(out), "--tile", "128")
    assert run_cli(*args, "--viewer-chunk", "32").exit_code == 0
    result = run_cli(*args, "--viewer-chunk", "0", "--resume")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--overwrite" in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(
    ("shape", "tile", "inner", "dtype", "options"),
    [
        ((100, 70), (64, 64), (16, 16), np.uint16, {}),  # image: lz4 + shuffle
        ((100, 70), (64, 64), (16, 32), np.uint64, {"labels": True}),
        ((5, 40, 37), (2, 32, 32), (1, 16, 8), np.uint32, {"labels": True}),
        ((40, 40), (32, 32), (16, 16), np.float32, {"compress": False}),
    ],
)
def test_shards_written_here_are_the_bytes_zarr_writes(
    tmp_path: Path, shape: tuple, tile: tuple, inner: tuple, dtype: type, options: dict
) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for path in (ours, theirs):
        omezarr.create_array(path, shape=shape, chunks=tile, dtype=dtype, inner=inner, **options)
    lay = omezarr._layout(str(ours), omezarr._stamp(ours))
    assert lay is not None and lay.inner == inner and lay.chunks == tile
    rng = np.random.default_rng(0)
    data = rng.integers(0, 50, shape).astype(dtype)
    data[: shape[0] // 2] = 0  # fill-valued inner chunks are stored too, as zarr does
    blocks = [b.core for b in BlockGrid.build(shape, tile=tile, halo=0)]
    for region in blocks:
        omezarr.write_block(ours, region, data[region])
    zarr.open_array(str(theirs), mode="r+").with_config({"write_empty_chunks": True})[...] = data
    files = sorted(p.relative_to(ours) for p in (ours / "c").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(theirs) for p in (theirs / "c").rglob("*") if p.is_file())
    for name in files:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    np.testing.assert_array_equal(zarr.open_array(str(ours), mode="r")[...], data)
    for region in blocks:
        np.testing.assert_array_equal(omezarr.read_block(theirs, region), data[region])
    # a region that is not one shard goes through zarr, and the shards it touched are noted
    from segpipe.io import written

    part = tuple(slice(0, min(n, t + 3)) for n, t in zip(shape, tile, strict=True))
    with written.recording() as files_written:
        omezarr.write_block(ours, part, data[part] + 1)
    assert {Path(f.path) for f in files_written} == {lay.path(i) for i in lay.covered(part)}
    np.testing.assert_array_equal(zarr.open_array(str(ours), mode="r")[part], data[part] + 1)


def test_a_damaged_shard_index_is_an_error_not_zeros(tmp_path: Path) -> None:
    path = tmp_path / "a"
    omezarr.create_array(path, shape=(32, 32), chunks=(32, 32), dtype=np.uint32, inner=(16, 16))
    omezarr.write_block(path, (slice(0, 32), slice(0, 32)), np.ones((32, 32), np.uint32))
    shard = path / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="crc32c"):
        omezarr.read_block(path, (slice(0, 32), slice(0, 32)))
