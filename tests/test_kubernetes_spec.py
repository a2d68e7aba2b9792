"""The per-run DaskCluster's data access: `kubernetes.volumes`, `volume_mounts`,
`secret_env` and `env_from_secrets` reach the worker pods as references (never a
secret's value), the resource still fits the operator's CRD, and mistakes in run.yaml
are one line naming the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from segpipe import backends
from segpipe.config import load_config
from segpipe.errors import ConfigError
from tests.helpers import cluster_spec_app
from tests.test_deploy import validate_crd

DATA_ACCESS: dict[str, Any] = {
    "volumes": [
        {"name": "data", "persistentVolumeClaim": {"claimName": "segpipe-data"}},
        {"name": "scratch", "emptyDir": {"sizeLimit": "20Gi"}},
    ],
    "volume_mounts": [
        {"name": "data", "mountPath": "/data", "readOnly": True},
        {"name": "scratch", "mountPath": "/scratch"},
    ],
    "secret_env": {
        "AWS_ACCESS_KEY_ID": {"secret": "segpipe-s3", "key": "access-key"},
        "AWS_SECRET_ACCESS_KEY": {"secret": "segpipe-s3", "key": "secret-key"},
    },
    "env_from_secrets": ["segpipe-extra"],
    "env": {"OMP_NUM_THREADS": "1"},
}


def _write(path: Path, kubernetes: dict[str, Any]) -> Path:
    run = {
        "input": "s3://bucket/in/",
        "output": "s3://bucket/out.zarr",
        "cluster": "kubernetes",
        "storage": {"endpoint": "http://minio.storage:9000", "region": "eu-west-1"},
        "kubernetes": {"image": "registry/segpipe:cpu", **kubernetes},
    }
    path.write_text(yaml.safe_dump(run), encoding="utf-8")
    return path


def _pod(spec: dict[str, Any], part: str) -> dict[str, Any]:
    return dict(spec["spec"][part]["spec"])


@pytest.mark.parametrize("tls", [False, True])
def test_cluster_spec_prints_volumes_mounts_and_secret_references(
    tmp_path: Path, tls: bool
) -> None:
    section = {**DATA_ACCESS, **({"tls_secret": "dask-tls"} if tls else {})}
    config = _write(tmp_path / "run.yaml", section)
    result = CliRunner().invoke(cluster_spec_app(), ["cluster-spec", "--config", str(config)])
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load(result.output)
    assert spec == backends.kubernetes_cluster_spec(load_config(config))
    validate_crd(spec)  # what the operator's API server accepts

    worker_pod = _pod(spec, "worker")
    worker = worker_pod["containers"][0]
    tls_volume = [{"name": "dask-tls", "secret": {"secretName": "dask-tls"}}] if tls else []
    assert worker_pod["volumes"] == tls_volume + DATA_ACCESS["volumes"]
    tls_mount = [{"name": "dask-tls", "mountPath": "/etc/segpipe/tls", "readOnly": True}]
    assert worker["volumeMounts"] == (tls_mount if tls else []) + DATA_ACCESS["volume_mounts"]
    env = {e["name"]: e for e in worker["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {
        "name": "AWS_ACCESS_KEY_ID",
        "valueFrom": {"secretKeyRef": {"name": "segpipe-s3", "key": "access-key"}},
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "secret-key"
    assert env["OMP_NUM_THREADS"] == {"name": "OMP_NUM_THREADS", "value": "1"}
    assert backends.WORKER_ENV_VAR in env  # the malloc settings stay
    assert worker["envFrom"] == [{"secretRef": {"name": "segpipe-extra"}}]
    for entry in worker["env"]:  # a Secret is referenced, its value never written
        assert ("value" in entry) != ("valueFrom" in entry), entry

    # The scheduler reads no pixels: no data volumes, no credentials.
    scheduler_pod = _pod(spec, "scheduler")
    scheduler = scheduler_pod["containers"][0]
    assert scheduler_pod.get("volumes", []) == tls_volume
    assert scheduler.get("volumeMounts", []) == (tls_mount if tls else [])
    assert "envFrom" not in scheduler
    assert not [e for e in scheduler["env"] if "valueFrom" in e or e["name"].startswith("AWS_")]


def test_without_data_access_the_spec_is_as_before(tmp_path: Path) -> None:
    spec = backends.kubernetes_cluster_spec(load_config(_write(tmp_path / "run.yaml", {})))
    validate_crd(spec)
    worker_pod = _pod(spec, "worker")
    assert "volumes" not in worker_pod
    assert "volumeMounts" not in worker_pod["containers"][0]
    assert "envFrom" not in worker_pod["containers"][0]


def test_the_crd_refuses_a_malformed_volume(tmp_path: Path) -> None:
    """Volumes pass through as written; the schema of the operator's CRD still checks
    them, as the API server would."""
    import jsonschema

    bad = {"name": "data", "persistentVolumeClaim": {"claimName": "x", "readonly": True}}
    config = _write(tmp_path / "run.yaml", {"volumes": [bad]})
    with pytest.raises(jsonschema.ValidationError, match="readonly"):
        validate_crd(backends.kubernetes_cluster_spec(load_config(config)))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"volumes": [{"name": "data", "emptyDir": {}}], "volume_mounts": [{"name": "dta"}]},
            "kubernetes.volume_mounts: Value error, volume_mounts[0]: expected a `name` and "
            "a `mountPath`",
        ),
        (
            {
                "volumes": [{"name": "data", "emptyDir": {}}],
                "volume_mounts": [{"name": "dta", "mountPath": "/data"}],
            },
            "kubernetes: Value error, volume_mounts: 'dta' is not one of kubernetes.volumes "
            "(those are: data)",
        ),
        (
            {"volume_mounts": [{"name": "data", "mountPath": "/data"}]},
            "volume_mounts: 'data' is not one of kubernetes.volumes (those are: none)",
        ),
        (
            {"volume_mounts": [{"name": "data", "mountpath": "/data"}]},
            "volume_mounts[0]: expected keys among name, mountPath",
        ),
        (
            {"volume_mounts": [{"name": "data", "mountPath": "data"}]},
            "volume_mounts[0]: expected an absolute mountPath used once, got 'data'",
        ),
        (
            {"volumes": [{"persistentVolumeClaim": {"claimName": "x"}}]},
            "kubernetes.volumes: Value error, volumes[0]: expected a `name`",
        ),
        (
            {"volumes": [{"name": "Data", "emptyDir": {}}]},
            "volumes[0]: expected a `name` of lower-case letters",
        ),
        (
            {"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]},
            "volumes[1]: expected unique names, got 'a' twice",
        ),
        (
            {"tls_secret": "dask-tls", "volumes": [{"name": "dask-tls", "emptyDir": {}}]},
            "volumes: 'dask-tls' is the volume of tls_secret",
        ),
        (
            {"secret_env": {"AWS-KEY": {"secret": "s3", "key": "k"}}},
            "kubernetes.secret_env: Value error, expected environment variable names, "
            "got 'AWS-KEY'",
        ),
        (
            {"secret_env": {"KEY": {"secret": "S3 creds", "key": "k"}}},
            "kubernetes.secret_env.KEY.secret: Value error, expected a Secret name",
        ),
        (
            {"secret_env": {"KEY": {"secret": "s3", "value": "hunter2"}}},
            "kubernetes.secret_env.KEY.value: Extra inputs are not permitted",
        ),
        (
            {"env": {"KEY": "x"}, "secret_env": {"KEY": {"secret": "s3", "key": "k"}}},
            "expected each variable in env or secret_env, got ['KEY'] in both",
        ),
        (
            {"env_from_secrets": ["S3"]},
            "kubernetes.env_from_secrets: Value error, expected a Secret",
        ),
    ],
)
def test_mistakes_are_one_line_naming_the_key(
    tmp_path: Path, section: dict[str, Any], message: str
) -> None:
    config = _write(tmp_path / "run.yaml", section)
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_config(config)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{config}: ")
