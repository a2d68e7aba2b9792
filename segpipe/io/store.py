"""The output store as a whole: which run owns it, which images are complete."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import zarr

from segpipe.errors import OutputConflictError

KEY = "segpipe"


def attrs_section(group: zarr.Group, key: str) -> dict[str, Any]:
    """One top-level mapping of a group's attributes ({} if absent)."""
    value = group.attrs.asdict().get(key)
    return dict(value) if isinstance(value, dict) else {}


def fingerprint(settings: dict[str, Any]) -> str:
    """Stable hash of the settings that decide the output's pixels."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_output(root: str | Path, run: dict[str, Any], *, overwrite: bool = False) -> zarr.Group:
    """Open (creating) the output store for a run with these settings.

    Raises
    ------
    OutputConflictError
        If ``root`` holds another run's results (different settings) or
        something that is not a segpipe store, and ``overwrite`` is False.
    """
    root = Path(root)
    fp = fingerprint(run)
    if root.exists() and not root.is_dir():
        raise OutputConflictError(f"{root}: output path exists and is not a directory.")
    if root.exists() and any(root.iterdir()):
        try:
            group = zarr.open_group(str(root), mode="r")
            held: dict[str, Any] | None = attrs_section(group, KEY)
        except Exception:  # not a Zarr group at all
            held = None
        if held is None or "fingerprint" not in held:
            if not overwrite:
                raise OutputConflictError(
                    f"{root}: output folder is not empty and is not a segpipe store; "
                    "choose another output or pass --overwrite."
                )
            shutil.rmtree(root)
        elif held["fingerprint"] != fp:
            if not overwrite:
                raise OutputConflictError(
                    f"{root}: output already holds a different run "
                    f"(segmenter {held.get('run', {}).get('segmenter', '?')!r}, fingerprint "
                    f"{held['fingerprint']}); choose another output or pass --overwrite."
                )
            shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(root), mode="a", zarr_format=3)
    group.attrs[KEY] = {"fingerprint": fp, "run": run}
    return group


def mark_image(image_path: str | Path, **state: Any) -> None:
    """Update an image group's segpipe attributes (``complete`` is written last)."""
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
