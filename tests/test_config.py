"""The run configuration: ``tile: auto`` and explicit tiles, the checks of every option."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from segpipe.config import AUTO_TILE, RunConfig, block_tile, check_image_options, load_config
from segpipe.errors import ConfigError, SegmenterError
from segpipe.io.readers import SourceSpec


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
    from segpipe.image import ImagePlan, check_tile
    from segpipe.io.readers import SourceSpec
    from segpipe.segmenters import get_segmenter

    volume = SourceSpec("/data/v.tif", "v", "tiff", "ZYX", (256, 1024, 1024), "uint16", None)
    check_tile(volume, block_tile("auto", 3, volume.shape))  # 256³: 128 MiB of uint64
    check_tile(volume, (256, 1024, 1023))  # 2 MiB under 2^31 bytes: fits
    with pytest.raises(ConfigError, match=r"/data/v\.tif: tile \[1024, 1024, 1024\] makes"):
        ImagePlan(volume, "/out", (1024, 1024, 1024), get_segmenter("otsu"))


@pytest.mark.parametrize("halo", [-5, [2, -1], []])
def test_negative_halos_are_refused(halo: object) -> None:
    with pytest.raises(ValidationError, match="halo"):
        RunConfig(input="a", output="b", halo=halo)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [{"retry_delay": float("inf")}, {"retry_delay": float("nan")}])
def test_run_numbers_are_finite(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="finite"):
        RunConfig(input="a", output="b", **bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["5", "[otsu]", "true"])
def test_a_segmenter_that_is_neither_a_name_nor_a_mapping(tmp_path, value: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "run.yaml"
    path.write_text(f"input: a.tif\noutput: o.zarr\nsegmenter: {value}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: segmenter: expected a name"):
        load_config(path)


def test_every_numeric_segmenter_option_is_finite() -> None:
    from segpipe.segmenters import get_segmenter
    from segpipe.segmenters.base import Options

    checked = 0
    for name in ("otsu", "multiotsu", "threshold", "local", "region-growing", "watershed"):
        seg = get_segmenter(name)
        for field, info in type(seg.options).model_fields.items():
            if "float" not in str(info.annotation):
                continue
            for bad in (float("inf"), float("nan"), "-1e400"):
                with pytest.raises(SegmenterError, match=field):
                    get_segmenter(name, **{field: bad})
            checked += 1
    assert checked >= 10
    assert Options.model_config.get("allow_inf_nan") is False


def _spec(shape: tuple[int, ...]) -> SourceSpec:
    axes = "ZYX"[3 - len(shape) :]
    return SourceSpec("/data/im.tif", "im", "tiff", axes, shape, "uint16", None)


def test_image_options_fit_each_image() -> None:
    from segpipe.segmenters import get_segmenter

    config = RunConfig(input="a", output="b")
    plane, dot, volume = _spec((600, 800)), _spec((1, 1)), _spec((4, 64, 64))
    check_image_options(config, get_segmenter("otsu", sigma=200), plane)  # radius 800: fits
    check_image_options(config, get_segmenter("otsu"), dot)  # tiny images take usual sigmas
    check_image_options(config, get_segmenter("local"), dot)
    check_image_options(config, get_segmenter("otsu", sigma=[0.5, 2, 2]), volume)
    with pytest.raises(ConfigError, match=r"/data/im\.tif .*sigma 200\.5 .* sigma <= 200"):
        check_image_options(config, get_segmenter("otsu", sigma=200.5), plane)
    with pytest.raises(ConfigError, match=r"/data/im\.tif .*sigma 1e\+308"):
        check_image_options(config, get_segmenter("otsu", sigma=1e308), plane)
    with pytest.raises(ConfigError, match=r"sigma \[1\.0, 2\.0\]: expected one value or 3"):
        check_image_options(config, get_segmenter("otsu", sigma=[1, 2]), volume)
    with pytest.raises(ConfigError, match=r"block_size 1701 \(median\) reads 850 .* <= 1601"):
        check_image_options(config, get_segmenter("local", block_size=1701, method="median"), plane)
    for option in ("tile", "halo"):
        with pytest.raises(ConfigError, match=rf"/data/im\.tif: {option} \[8, 8, 8\] has 3"):
            check_image_options(
                RunConfig(input="a", output="b", **{option: [8, 8, 8]}),
                get_segmenter("otsu"),
                plane,
            )  # type: ignore[arg-type]
