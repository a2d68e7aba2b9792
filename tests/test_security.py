"""Services on loopback by default; Dask TLS and Prefect API auth taken from the config."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
import zarr
from distributed import LocalCluster
from distributed.security import Security

from segpipe import synthetic
from segpipe.cluster import connect
from tests.helpers import free_port

pytestmark = pytest.mark.integration


def test_local_cluster_listens_on_loopback_only() -> None:
    with connect("local", workers=1, threads=1) as client:
        info = client.scheduler_info()
        addresses = [client.scheduler.address, *info["workers"]]
        assert all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:"), link


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    security = Security.temporary()
    d = tmp_path_factory.mktemp("tls")
    files = {}
    for key, pem in (
        ("ca_file", security.tls_ca_file),
        ("cert", security.tls_client_cert),
        ("key", security.tls_client_key),
    ):
        files[key] = str(d / f"{key}.pem")
        Path(files[key]).write_text(pem)
    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        protocol="tls",
        host="127.0.0.1",
        security=security,
        dashboard_address=None,
    ) as cluster:
        yield cluster.scheduler_address, files


def test_tls_scheduler_with_certificates_from_the_config(
    run_cli, tls_cluster, tmp_path: Path
) -> None:
    address, files = tls_cluster
    assert address.startswith("tls://")
    image = synthetic.write_tiff(tmp_path / "a.tif", (300, 300), seed=1)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": str(image),
                "output": str(tmp_path / "o.zarr"),
                "cluster": address,
                "security": files,
            }
        )
    )
    result = run_cli("--config", str(config))
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(tmp_path / "o.zarr" / "a"), mode="r")
    assert group.attrs["segpipe"]["complete"] is True
    # without certificates the run refuses, before any compute
    config.write_text(
        yaml.safe_dump(
            {"input": str(image), "output": str(tmp_path / "p.zarr"), "cluster": address}
        )
    )
    result = run_cli("--config", str(config))
    assert result.exit_code == 1
    assert "needs `security`" in " ".join(result.output.split())


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server` on loopback that demands an auth string."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_AUTH_STRING": "admin:s3cret",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"{url}/health", auth=("admin", "s3cret"), timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("prefect server did not start")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_prefect_api_auth_from_the_config(prefect_server: str, tmp_path: Path) -> None:
    image = synthetic.write_tiff(tmp_path / "a.tif", (200, 200), seed=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "client-home")
    segpipe = str(Path(sys.executable).parent / "segpipe")

    def run(config: dict[str, object]) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return subprocess.run(
            [segpipe, "run", "--quiet", "--config", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    base = {"input": str(image), "output": str(tmp_path / "o.zarr")}
    denied = run({**base, "prefect": {"api_url": prefect_server, "auth_string": "admin:wrong"}})
    assert denied.returncode == 1
    assert "refused" in denied.stderr and prefect_server in denied.stderr
    assert "wrong" not in denied.stderr  # the secret is not echoed
    ok = run(
        {
            **base,
            "overwrite": True,
            "prefect": {"api_url": prefect_server, "auth_string": "admin:s3cret"},
        }
    )
    assert ok.returncode == 0, ok.stderr
    runs = httpx.post(
        f"{prefect_server}/flow_runs/filter",
        json={"limit": 5},
        auth=("admin", "s3cret"),
        timeout=10,
    ).json()
    assert any(r["state_type"] == "COMPLETED" for r in runs)
    params = [r["parameters"] for r in runs]
    assert all("s3cret" not in str(p) for p in params)  # kept out of the run's parameters
