"""Prefect's local API (`flows.local_api`): started by the first ``segpipe run`` of a
machine, reused by the runs after it, gone once unused; a one-block image needs no
cluster. Real ``segpipe run`` processes, as on a laptop (no PREFECT_API_URL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import tifffile
import zarr

from segpipe import synthetic
from tests.helpers import same_up_to_renumbering
from tests.test_exactness import reference

pytestmark = pytest.mark.integration

SEGPIPE = str(Path(sys.executable).parent / "segpipe")
IDLE = 3  # seconds the API stays up unused


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home for the module: its Prefect database is created once."""
    return tmp_path_factory.mktemp("home")


def _run(image: Path, out: Path, home: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SEGPIPE_"))}
    env.update(HOME=str(home), SEGPIPE_API_IDLE=str(IDLE))
    done = subprocess.run(
        [SEGPIPE, "run", "-i", str(image), "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stderr


def _state(home: Path) -> Path:
    return home / ".segpipe" / "prefect" / "segpipe-api.json"


def test_the_next_run_reuses_the_api_then_it_exits(home: Path, tmp_path: Path) -> None:
    image = synthetic.write_tiff(tmp_path / "one.tif", (300, 260), seed=3)
    first = _run(image, tmp_path / "a.zarr", home)
    header = first.splitlines()[0]
    assert "in this process (one block: no cluster)" in header, first
    assert "starting Prefect's local API" in header, first
    state = json.loads(_state(home).read_text())
    api = psutil.Process(state["pid"])

    second = _run(image, tmp_path / "b.zarr", home)
    assert "Prefect's local API" not in second.splitlines()[0], second
    assert json.loads(_state(home).read_text())["pid"] == api.pid
    # both runs are recorded in it
    runs = httpx.post(f"{state['url']}/flow_runs/filter", json={}, timeout=10).json()
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    # its files are this user's only
    for path in [_state(home), *_state(home).parent.glob("prefect.db*")]:
        assert oct(path.stat().st_mode & 0o777) == "0o600", path
    # the run without a cluster segments as scikit-image does on the whole image
    labels = zarr.open_array(str(tmp_path / "b.zarr" / "one" / "labels" / "instances" / "0"))[:]
    assert same_up_to_renumbering(labels, reference(tifffile.imread(image)))

    # unused, it exits, and its address goes with it
    assert psutil.wait_procs([api], timeout=IDLE + 15)[1] == []
    assert not _state(home).exists()


def test_a_state_naming_another_process_starts_a_new_api(home: Path, tmp_path: Path) -> None:
    image = synthetic.write_tiff(tmp_path / "one.tif", (200, 200), seed=4)
    # a state file that outlived a reboot: its pid is now some other process
    other = subprocess.Popen(["sleep", "120"])
    try:
        from importlib.metadata import version

        versions = {"prefect": version("prefect"), "python": sys.executable}
        _state(home).parent.mkdir(parents=True, exist_ok=True)
        _state(home).write_text(
            json.dumps({"url": "http://127.0.0.1:9/api", "pid": other.pid, "versions": versions})
        )
        err = _run(image, tmp_path / "out.zarr", home)
        assert "starting Prefect's local API" in err.splitlines()[0], err
        assert other.poll() is None  # never touched
        assert json.loads(_state(home).read_text())["pid"] != other.pid
    finally:
        other.kill()
        other.wait()


def _configured(tmp_path: Path, **env: str) -> bool:
    """`local_api.configured()` in a new process (no Prefect imported), in ``tmp_path``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SEGPIPE_"))}
    clean.update(PREFECT_HOME=str(tmp_path / "prefect"), **env)
    done = subprocess.run(
        [sys.executable, "-c", "from flows import local_api; print(local_api.configured())"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip() == "True"


def test_a_server_configured_anywhere_prefect_looks_is_used_not_a_local_api(
    tmp_path: Path, prefect_api: None
) -> None:
    assert not _configured(tmp_path)
    assert _configured(tmp_path, PREFECT_API_URL="http://10.0.0.5:4200/api")
    # the active profile of PREFECT_HOME (`prefect config set PREFECT_API_URL=...`)
    (tmp_path / "prefect" / "profiles.toml").write_text(
        'active = "lab"\n[profiles.lab]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n'
    )
    assert _configured(tmp_path)
    assert not _configured(tmp_path, PREFECT_PROFILE="ephemeral")
    (tmp_path / "prefect" / "profiles.toml").unlink()
    (tmp_path / "prefect.toml").write_text('[api]\nurl = "http://10.0.0.5:4200/api"\n')
    assert _configured(tmp_path)
    # in a process where Prefect is imported (this test session's API): its settings
    from flows import local_api

    assert local_api.configured()
