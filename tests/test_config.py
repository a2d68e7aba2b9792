"""The block size a run uses: ``tile: auto`` and explicit tiles."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from segpipe.config import AUTO_TILE, RunConfig, block_tile
from segpipe.errors import ConfigError


def test_auto_is_the_default_and_measured_per_dimensionality() -> None:
    config = RunConfig(input="in.tif", output="out.zarr")
    assert config.tile == "auto"
    assert block_tile(config.tile, 2) == (AUTO_TILE[2],) * 2 == (2048, 2048)
    assert block_tile(config.tile, 3) == (256, 256, 256)  # volumes: 2^24 voxels a block
    assert block_tile(config.tile, 3, (300, 5000, 5000)) == (256, 256, 256)
    assert block_tile(config.tile, 3, (64, 5000, 5000)) == (64, 512, 512)  # thin: whole depth
    assert block_tile(config.tile, 3, (100, 5000, 5000)) == (100, 256, 256)
    assert block_tile(config.tile, 3, (1, 5000, 5000)) == (1, 2048, 2048)  # never above planes'


def test_explicit_tiles_are_kept() -> None:
    assert block_tile(RunConfig(input="a", output="b", tile=512).tile, 3) == (512, 512, 512)
    assert block_tile(RunConfig(input="a", output="b", tile=[8, 64, 64]).tile, 3) == (8, 64, 64)
    with pytest.raises(ConfigError, match="expected 'auto', an int or 2 ints"):
        block_tile([8, 64, 64], 2)


@pytest.mark.parametrize("tile", ["big", 0, [64, -1]])
def test_bad_tiles_are_refused(tile: object) -> None:
    with pytest.raises(ValidationError):
        RunConfig(input="a", output="b", tile=tile)  # type: ignore[arg-type]


def test_a_tile_whose_label_chunks_blosc_cannot_hold_is_refused_naming_the_file() -> None:
    from segpipe.io.readers import SourceSpec
    from segpipe.pipeline import ImagePlan, check_tile
    from segpipe.segmenters import get_segmenter

    volume = SourceSpec("/data/v.tif", "v", "tiff", "ZYX", (256, 1024, 1024), "uint16", None)
    check_tile(volume, block_tile("auto", 3, volume.shape))  # 256³: 128 MiB of uint64
    check_tile(volume, (256, 1024, 1023))  # 2 MiB under 2^31 bytes: fits
    with pytest.raises(ConfigError, match=r"/data/v\.tif: tile \[1024, 1024, 1024\] makes"):
        ImagePlan(volume, "/out", (1024, 1024, 1024), get_segmenter("otsu"))
