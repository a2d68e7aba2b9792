"""Inputs and outputs in object storage, against a real S3 server (moto) on 127.0.0.1.

Each run is a real ``segpipe`` process with its own LocalCluster: its workers get the
server's address and the (fake) credentials from the environment, as pods get them
from a Secret. Results are compared, array by array and table by table, with a run
of the same input from and to local disk.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from segpipe import synthetic
from tests.helpers import (
    OBJECT_RUN_ARGS,
    RESULT_ARRAYS,
    RESULT_TABLES,
    free_port,
    segpipe_run,
)

pytestmark = pytest.mark.integration

ARGS, ARRAYS, TABLES = OBJECT_RUN_ARGS, RESULT_ARRAYS, RESULT_TABLES


@contextmanager
def _moto(**env: str) -> Iterator[int]:
    """A moto S3 server on 127.0.0.1 (its own ``env`` beside ours), its port once it
    answers; stopped on leaving."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server for this module and the environment that points clients at it."""
    with _moto() as port:
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def bucket(s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> object:
    """The bucket ``lab`` holding ``scans/a.tif`` and an OME-Zarr ``scans/b.ome.zarr``."""
    import s3fs
    from ome_zarr.writer import write_image

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("lab")
    local = tmp_path_factory.mktemp("scans")
    synthetic.write_tiff(local / "a.tif", (768, 640), tile=128, seed=3)
    fs.put(str(local / "a.tif"), "lab/scans/a.tif")
    group = zarr.open_group(str(local / "b.ome.zarr"), mode="w")
    image, _ = synthetic.render((slice(0, 700), slice(0, 600)), seed=4)
    write_image(image, group, scale_factors=[2], axes="yx")
    fs.put(str(local / "b.ome.zarr"), "lab/scans/b.ome.zarr", recursive=True)
    return fs


def _same(local: Path, remote: str, name: str) -> None:
    """Every array and table of image ``name`` equal in both stores."""
    for key in ARRAYS:
        a = zarr.open_array(str(local / name / key), mode="r")
        b = zarr.open_array(f"{remote}/{name}/{key}", mode="r")
        assert a.shape == b.shape and a.dtype == b.dtype, key
        np.testing.assert_array_equal(a[...], b[...], err_msg=key)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for key in TABLES:
        with fs.open(f"{remote.removeprefix('s3://')}/{name}/{key}", "rb") as fh:
            theirs = pq.read_table(fh)
        assert pq.read_table(local / name / key).equals(theirs), key


@pytest.mark.parametrize(
    "source, name",
    [
        ("s3://lab/scans/a.tif", "a"),
        pytest.param("s3://lab/scans/b.ome.zarr", "b", marks=pytest.mark.slow),
    ],
)
def test_s3_input_and_output_equal_a_local_run(
    bucket: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, name: str
) -> None:
    fs: object = bucket
    local_in = tmp_path / source.rsplit("/", 1)[1]
    fs.get(source.removeprefix("s3://"), str(local_in), recursive=True)  # type: ignore[attr-defined]
    monkeypatch.chdir(tmp_path)  # a folder named after the scheme would land here
    out = f"s3://lab/out-{name}.zarr"
    done = segpipe_run("--input", source, "--output", out, *ARGS)
    assert done.returncode == 0, done.stderr
    again = segpipe_run("--input", source, "--output", out, "--resume", *ARGS)
    assert again.returncode == 0, again.stderr
    assert "1 unchanged" in again.stdout + again.stderr
    local_out = tmp_path / "local.zarr"
    ref = segpipe_run("--input", str(local_in), "--output", str(local_out), *ARGS)
    assert ref.returncode == 0, ref.stderr
    _same(local_out, out, name)
    shown = subprocess.run(
        [str(Path(sys.executable).with_name("segpipe")), "inspect", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert " complete " in shown.stdout and "orphaned" not in shown.stdout, shown.stdout
    listed = fs.ls(f"lab/out-{name}.zarr/_segpipe")  # type: ignore[attr-defined]
    assert not any(p.endswith("lock.json") for p in listed)  # released
    assert not (tmp_path / "s3:").exists()


def test_a_scheduled_run_reads_and_writes_the_bucket(
    bucket: object, prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`segpipe serve` hands each scheduled run `deployment_parameters` of its run.yaml:
    the URLs and the storage settings reach the flow as they were written."""
    from flows.segment import heartbeats_as_set, segment_collection
    from flows.serve import deployment_parameters
    from segpipe.config import load_config

    monkeypatch.chdir(tmp_path)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    config = tmp_path / "run.yaml"
    config.write_text(
        "input: s3://lab/scans/a.tif\noutput: s3://lab/out-nightly.zarr\n"
        f"segmenter: watershed\ncluster: local\nstorage:\n  endpoint: {endpoint}\n",
        encoding="utf-8",
    )
    params = deployment_parameters(load_config(config))["config"]
    assert params["input"] == "s3://lab/scans/a.tif"
    assert params["output"] == "s3://lab/out-nightly.zarr"
    assert params["storage"]["endpoint"] == endpoint
    for night in ("1 processed", "1 unchanged"):  # as the runner calls the flow, twice
        with heartbeats_as_set():
            rows = segment_collection(params)
        assert [r["status"] for r in rows] == (
            ["done"] if night == "1 processed" else ["unchanged"]
        ), rows
    fs: object = bucket
    assert fs.exists("lab/out-nightly.zarr/a/labels/instances/0/zarr.json")  # type: ignore[attr-defined]
    assert not (tmp_path / "s3:").exists()


@pytest.mark.slow  # 45 s: a run of 30 blocks a stage killed, then resumed
def test_a_killed_run_resumes_in_the_bucket(bucket: object, tmp_path: Path) -> None:
    fs: object = bucket
    out = "s3://lab/killed.zarr"
    args = ("--input", "s3://lab/scans/a.tif", "--output", out, *ARGS[:2], "--tile", "128")
    run = subprocess.Popen(
        [str(Path(sys.executable).with_name("segpipe")), "run", *args, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    markers = "lab/killed.zarr/_segpipe/blocks/a/segment"
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        fs.invalidate_cache()  # type: ignore[attr-defined]
        if fs.exists(markers) and len(fs.ls(markers)) >= 8:  # type: ignore[attr-defined]
            break
        time.sleep(0.2)
    assert run.poll() is None, "the run ended before it could be killed"
    os.killpg(run.pid, signal.SIGKILL)  # the run and its workers, mid-segment
    run.wait()
    resumed = segpipe_run(*args, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    local_in = tmp_path / "a.tif"
    fs.get("lab/scans/a.tif", str(local_in))  # type: ignore[attr-defined]
    ref = segpipe_run("--input", str(local_in), "--output", str(tmp_path / "ref.zarr"), *args[4:])
    assert ref.returncode == 0, ref.stderr
    _same(tmp_path / "ref.zarr", out, "a")


def test_an_object_or_a_foreign_prefix_as_output_is_refused(bucket: object) -> None:
    fs: object = bucket
    fs.pipe("lab/theirs/notes.txt", b"keep me")  # type: ignore[attr-defined]
    for out, why in [
        ("s3://lab/theirs/notes.txt", "is an object, not a folder"),
        ("s3://lab/theirs", "is not a segpipe store"),
    ]:
        done = segpipe_run("--input", "s3://lab/scans/a.tif", "--output", out, *ARGS)
        assert done.returncode != 0
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and out in lines[0] and why in lines[0], done.stderr
    assert fs.cat("lab/theirs/notes.txt") == b"keep me"  # type: ignore[attr-defined]
    assert fs.ls("lab/theirs") == ["lab/theirs/notes.txt"]  # type: ignore[attr-defined]


def test_a_missing_bucket_is_one_line(bucket: object) -> None:
    done = segpipe_run("--input", "s3://lab/scans/a.tif", "--output", "s3://nobucket/o.zarr", *ARGS)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "s3://nobucket/o.zarr" in lines[0] and "does not exist" in lines[0]


def test_a_wrong_credential_is_one_line(tmp_path: Path) -> None:
    """A server that checks credentials (moto's IAM checks from the first request) and
    does not know the key: reached through run.yaml's ``storage: endpoint``."""
    with _moto(INITIAL_NO_AUTH_ACTION_COUNT="0") as port:
        image = synthetic.write_tiff(tmp_path / "c.tif", (256, 256), tile=128, seed=5)
        config = tmp_path / "run.yaml"
        config.write_text(
            f"input: {image}\noutput: s3://lab/o.zarr\n"
            f"storage:\n  endpoint: http://127.0.0.1:{port}\n",
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
        env |= {"AWS_ACCESS_KEY_ID": "AKIAWRONG0000000000", "AWS_SECRET_ACCESS_KEY": "hush1"}
        done = segpipe_run("--config", str(config), "--quiet", env=env)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: s3://lab/o.zarr: access refused"), lines[0]
    assert "hush1" not in done.stdout + done.stderr  # no secret is printed


class _Faults:
    """An HTTP proxy in front of the S3 server that answers some requests itself with
    an error, as a throttled or failing bucket does; the others pass through."""

    def __init__(self, upstream: int, fault: Callable[[str, str, int], int | None]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.count = 0
        self.faults = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's Expect: 100-continue

            def log_message(self, *args: object) -> None:
                return

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    outer.count += 1
                    status = fault(self.command, self.path, outer.count)
                    outer.faults += status is not None
                if status is not None:
                    code = "SlowDown" if status == 503 else "InternalError"
                    reply = f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
                    data = reply.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _through(tmp_path: Path, proxy: _Faults, out: str, attempts: int) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"input: s3://lab/scans/a.tif\noutput: {out}\nsegmenter: {{name: watershed}}\n"
        f"tile: 256\nstorage:\n  endpoint: http://127.0.0.1:{proxy.port}\n"
        f"  attempts: {attempts}\n",
        encoding="utf-8",
    )
    return config


@pytest.mark.slow  # 50 s: the backoff of some 80 refused requests
def test_throttled_requests_are_retried(
    s3_env: dict[str, str], bucket: object, tmp_path: Path
) -> None:
    upstream = int(s3_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = _Faults(upstream, lambda method, path, n: 503 if n % 25 == 0 else None)
    try:
        done = segpipe_run("--config", str(_through(tmp_path, proxy, "s3://lab/slow.zarr", 10)))
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr
    assert proxy.faults >= 20  # one in 25 of the run's requests was refused
    local_in = tmp_path / "a.tif"
    bucket.get("lab/scans/a.tif", str(local_in))  # type: ignore[attr-defined]
    ref = segpipe_run("--input", str(local_in), "--output", str(tmp_path / "ref.zarr"), *ARGS)
    assert ref.returncode == 0, ref.stderr
    _same(tmp_path / "ref.zarr", "s3://lab/slow.zarr", "a")


def test_a_failing_object_is_named(s3_env: dict[str, str], bucket: object, tmp_path: Path) -> None:
    upstream = int(s3_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])

    def fault(method: str, path: str, n: int) -> int | None:
        return 500 if method == "PUT" and "/labels/semantic/0/c/" in path else None

    proxy = _Faults(upstream, fault)
    try:
        done = segpipe_run("--config", str(_through(tmp_path, proxy, "s3://lab/broken.zarr", 2)))
    finally:
        proxy.close()
    assert done.returncode != 0
    assert "s3://lab/broken.zarr/a/labels/semantic/0/c/" in done.stderr, done.stderr
    assert "could not write it" in done.stderr


@pytest.mark.slow  # 42 s; on disk the same is in tests/test_data_safety.py
def test_damage_is_repaired_and_a_bad_object_skipped(bucket: object, tmp_path: Path) -> None:
    fs: object = bucket
    fs.put(
        str(synthetic.write_tiff(tmp_path / "d.tif", (512, 512), tile=128, seed=6)),
        "lab/mixed/d.tif",
    )  # type: ignore[attr-defined]
    fs.pipe("lab/mixed/bad.tif", b"II*\x00" + b"\x00" * 60)  # type: ignore[attr-defined]
    out = "s3://lab/mixed.zarr"
    args = ("--input", "s3://lab/mixed/", "--output", out, *ARGS)
    first = segpipe_run(*args, "--on-error", "skip")
    assert first.returncode == 3, first.stderr  # the good image done, the bad one reported
    assert "s3://lab/mixed/bad.tif" in first.stdout + first.stderr
    chunk = "lab/mixed.zarr/d/labels/instances/0/c/0/0"
    fs.rm(chunk)  # type: ignore[attr-defined]
    again = segpipe_run(*args, "--on-error", "skip", "--resume")
    assert again.returncode == 3, again.stderr
    assert "repaired" in again.stdout + again.stderr
    assert fs.exists(chunk)  # type: ignore[attr-defined]
    ref = segpipe_run(
        "--input", str(tmp_path / "d.tif"), "--output", str(tmp_path / "r.zarr"), *ARGS
    )
    assert ref.returncode == 0, ref.stderr
    _same(tmp_path / "r.zarr", out, "d")
