"""Cluster back-ends: what SLURM and Kubernetes runs would submit (built, never submitted),
the ``cluster-spec`` command, and the errors for a missing dask-cuda or an unknown cluster."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from segpipe import backends
from segpipe.cluster import connect
from segpipe.config import RunConfig, load_config
from segpipe.errors import ConfigError, SegpipeError
from tests.helpers import cluster_spec_app
from tests.test_deploy import validate_crd

TLS = {
    "ca_file": "/shared/tls/ca.pem",
    "cert": "/shared/tls/dask.pem",
    "key": "/shared/tls/key.pem",
}


def _config(**fields: Any) -> RunConfig:
    return RunConfig(input="/data/in", output="/data/out.zarr", **fields)


def _sbatch(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def _worker_command(script: str) -> list[str]:
    (line,) = [ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln]
    return shlex.split(line)


def _after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# --- SLURM ----------------------------------------------------------------------------


def test_slurm_job_script_for_a_gpu_partition() -> None:
    config = _config(
        cluster="slurm",
        slurm={
            "partition": "gpu",
            "account": "imaging",
            "cores": 16,
            "memory": "64GiB",
            "processes": 2,
            "gpus": 2,
            "walltime": "08:00:00",
            "job_extra_directives": ["--qos=high"],
            "job_script_prologue": ["module load cuda/12.8"],
            "python": "/shared/venv/bin/python",
            "local_directory": "$TMPDIR",
        },
    )
    script = backends.slurm_job_script(config)
    sbatch = _sbatch(script)
    for line in (
        "#SBATCH -p gpu",
        "#SBATCH -A imaging",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mem=64G",
        "#SBATCH -t 08:00:00",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --qos=high",
    ):
        assert line in sbatch, (line, sbatch)
    assert "module load cuda/12.8" in script.splitlines()
    worker = _worker_command(script)
    assert worker[0] == "/shared/venv/bin/python"
    assert _after(worker, "--resources") == "GPU=1"  # 2 GPUs over 2 worker processes
    assert _after(worker, "--nworkers") == "2"
    assert _after(worker, "--nthreads") == "8"
    assert _after(worker, "--local-directory") == "$TMPDIR"
    assert "--protocol" not in worker  # no TLS asked for


def test_slurm_defaults_ask_for_no_gpu() -> None:
    script = backends.slurm_job_script(_config(cluster="slurm"))
    sbatch = _sbatch(script)
    assert "#SBATCH --cpus-per-task=8" in sbatch
    assert "#SBATCH -t 04:00:00" in sbatch
    assert not any("gres" in line for line in sbatch)
    assert "--resources" not in _worker_command(script)


def test_slurm_passes_dask_tls_to_the_workers() -> None:
    script = backends.slurm_job_script(_config(cluster="slurm", security=TLS))
    worker = _worker_command(script)
    assert _after(worker, "--protocol") == "tls://"
    assert _after(worker, "--tls-ca-file") == TLS["ca_file"]
    assert _after(worker, "--tls-cert") == TLS["cert"]
    assert _after(worker, "--tls-key") == TLS["key"]


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="a SLURM machine: would submit")
def test_slurm_without_sbatch_fails_before_starting_anything() -> None:
    with pytest.raises(ConfigError, match="sbatch not found"), connect("slurm"):
        pass


@pytest.mark.parametrize(
    ("slurm", "message"),
    [
        ({"jobs": 2, "adaptive": {"maximum": 4}}, "`jobs` or `adaptive`"),
        ({"gpus": 3, "processes": 2, "cores": 4}, "gpus divisible by processes"),
        ({"adaptive": {"minimum": 5, "maximum": 2}}, "minimum <= maximum"),
        ({"queue": "gpu"}, "slurm.queue: Extra inputs are not permitted"),
    ],
)
def test_slurm_section_errors_name_the_key(slurm: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(
            None, {"input": "a.tif", "output": "o.zarr", "cluster": "slurm", "slurm": slurm}
        )


# --- Kubernetes -----------------------------------------------------------------------


def _kube(**section: Any) -> RunConfig:
    return _config(cluster="kubernetes", kubernetes={"image": "registry/segpipe:cuda", **section})


def _container(spec: dict[str, Any], part: str) -> dict[str, Any]:
    return dict(spec["spec"][part]["spec"]["containers"][0])


def test_kubernetes_spec_with_gpu_workers() -> None:
    spec = backends.kubernetes_cluster_spec(
        _kube(
            name="nightly",
            namespace="imaging",
            workers=3,
            cores=4,
            memory="32Gi",
            gpus=1,
            env={"OMP_NUM_THREADS": "1"},
            requests={"ephemeral-storage": "20Gi"},
        )
    )
    validate_crd(spec)  # what the operator's API server accepts
    assert spec["kind"] == "DaskCluster"
    assert spec["metadata"] == {
        "name": "nightly",
        "namespace": "imaging",
        "labels": {"app.kubernetes.io/part-of": "segpipe"},
    }
    assert spec["spec"]["worker"]["replicas"] == 3
    worker = _container(spec, "worker")
    assert worker["image"] == "registry/segpipe:cuda"
    assert worker["resources"]["limits"] == {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert worker["resources"]["requests"] == {
        "cpu": "4",
        "memory": "32Gi",
        "ephemeral-storage": "20Gi",
    }
    args = worker["args"]
    assert args[:2] == ["dask", "worker"]
    assert _after(args, "--resources") == "GPU=1"
    assert _after(args, "--nthreads") == "4"
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in worker["env"]
    scheduler = _container(spec, "scheduler")
    assert scheduler["image"] == "registry/segpipe:cuda"
    assert scheduler["args"][:2] == ["dask", "scheduler"]  # distributed has no dask-scheduler
    assert "nvidia.com/gpu" not in str(scheduler["resources"])
    assert spec["spec"]["scheduler"]["service"]["type"] == "ClusterIP"


def test_kubernetes_spec_cpu_adaptive_and_tls() -> None:
    spec = backends.kubernetes_cluster_spec(
        _kube(adaptive={"minimum": 1, "maximum": 10}, tls_secret="dask-tls")
    )
    validate_crd(spec)
    assert spec["spec"]["worker"]["replicas"] == 1  # adaptive starts at its minimum
    worker = _container(spec, "worker")
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    assert "--resources" not in worker["args"]
    assert worker["args"][2] == "tls://segpipe-scheduler:8786"
    scheduler = _container(spec, "scheduler")
    assert _after(scheduler["args"], "--protocol") == "tls"
    for container in (worker, scheduler):
        assert _after(container["args"], "--tls-ca-file") == "/etc/segpipe/tls/ca.pem"
        assert container["volumeMounts"][0]["mountPath"] == "/etc/segpipe/tls"
    volumes = spec["spec"]["worker"]["spec"]["volumes"]
    assert volumes == [{"name": "dask-tls", "secret": {"secretName": "dask-tls"}}]


def test_kubernetes_needs_its_section() -> None:
    with pytest.raises(ConfigError, match="needs a `kubernetes:` section"):
        load_config(None, {"input": "a", "output": "o.zarr", "cluster": "kubernetes"})
    with pytest.raises(ConfigError, match="`kubernetes:` section"), connect("kubernetes"):
        pass


def test_kubernetes_cluster_refuses_tls_before_contacting_kubernetes() -> None:
    config = _kube(tls_secret="dask-tls")
    with pytest.raises(ConfigError, match=r"cannot reach a TLS scheduler.*kubectl apply"):
        backends.kubernetes_cluster(config)


@pytest.mark.skipif(
    bool(os.environ.get("KUBECONFIG")) or (Path.home() / ".kube").exists(),
    reason="a Kubernetes context is configured: would create a DaskCluster",
)
def test_kubernetes_without_credentials_is_one_clear_error() -> None:
    with (
        pytest.raises(SegpipeError, match=r"cannot create DaskCluster 'segpipe'.*operator runs"),
        connect("kubernetes", kubernetes=_kube().kubernetes),
    ):
        pass


# --- the cluster-spec command ------------------------------------------------------------


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"input": "in", "output": "out.zarr", **config}))
    return path


def test_cluster_spec_command_prints_the_slurm_script(tmp_path: Path) -> None:
    config = _write(tmp_path / "run.yaml", {"cluster": "slurm", "slurm": {"gpus": 1}})
    result = CliRunner().invoke(cluster_spec_app(), ["cluster-spec", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("#!/usr/bin/env bash")
    assert "#SBATCH --gres=gpu:1" in result.output
    assert "--resources GPU=1" in result.output


def test_cluster_spec_command_prints_the_daskcluster(tmp_path: Path) -> None:
    config = _write(tmp_path / "run.yaml", {"kubernetes": {"image": "segpipe:cuda", "gpus": 1}})
    result = CliRunner().invoke(
        cluster_spec_app(), ["cluster-spec", "--config", str(config), "--cluster", "kubernetes"]
    )
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed == backends.kubernetes_cluster_spec(
        load_config(config, {"cluster": "kubernetes"})
    )
    validate_crd(printed)


def test_cluster_spec_command_refuses_other_clusters(tmp_path: Path) -> None:
    config = _write(tmp_path / "run.yaml", {})
    result = CliRunner().invoke(cluster_spec_app(), ["cluster-spec", "--config", str(config)])
    assert result.exit_code == 1
    assert "--cluster slurm or --cluster kubernetes" in result.output


# --- local-cuda and unknown clusters -----------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("dask_cuda") is not None, reason="dask-cuda is installed"
)
def test_local_cuda_without_dask_cuda_says_what_to_install() -> None:
    assert load_config(None, {"input": "a", "output": "o", "cluster": "local-cuda"})
    with (
        pytest.raises(ConfigError, match=r"needs dask-cuda.*pip install dask-cuda"),
        connect("local-cuda"),
    ):
        pass


@pytest.mark.parametrize("cluster", ["slurmm", "k8s", "http://host:8786", ""])
def test_unknown_cluster_is_refused_with_the_choices(cluster: str) -> None:
    choices = "'local', 'local-cuda', 'slurm', 'kubernetes', 'tcp://host:port' or 'tls://host:port'"
    with pytest.raises(ConfigError, match=re.escape(f"cluster: Value error, expected {choices}")):
        load_config(None, {"input": "a", "output": "o", "cluster": cluster})
    with (
        pytest.raises(ConfigError, match=re.escape(f"cluster {cluster!r}: expected {choices}")),
        connect(cluster),
    ):
        pass


def test_workers_get_segpipes_malloc_settings_everywhere(tmp_path: Path) -> None:
    """Local workers get them from the nanny; SLURM jobs, Kubernetes pods and the
    container images through the variable Dask reads as the nannies' environment."""
    import ast

    from distributed import Client

    from segpipe.backends import WORKER_ENV, WORKER_ENV_VAR
    from segpipe.cluster import local_cluster

    def started_with() -> dict[str, str | None]:
        # the environment the process started with, which glibc read: a variable set in
        # os.environ after the start (as a LocalCluster's env= is) has no effect on malloc
        with open("/proc/self/environ", "rb") as fh:
            pairs = [kv.decode().split("=", 1) for kv in fh.read().split(b"\0") if b"=" in kv]
        return {k: dict(pairs).get(k) for k in WORKER_ENV}

    with local_cluster(workers=1, threads=1) as cluster, Client(cluster) as client:
        env = client.run(started_with)
    assert list(env.values()) == [WORKER_ENV]
    value = repr(WORKER_ENV)
    assert ast.literal_eval(value) == WORKER_ENV  # as Dask parses it
    script = backends.slurm_job_script(_config(cluster="slurm"))
    (line,) = [ln for ln in script.splitlines() if ln.startswith(f"export {WORKER_ENV_VAR}=")]
    assert shlex.split(line)[1] == f"{WORKER_ENV_VAR}={value}"
    spec = backends.kubernetes_cluster_spec(
        _config(cluster="kubernetes", kubernetes={"image": "segpipe:cpu"})
    )
    worker_env = spec["spec"]["worker"]["spec"]["containers"][0]["env"]
    assert {"name": WORKER_ENV_VAR, "value": value} in worker_env
    root = Path(__file__).resolve().parent.parent / "deploy" / "docker"
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        assert f'ENV {WORKER_ENV_VAR}="{value}"' in (root / dockerfile).read_text()


def test_the_slurm_back_end_leaves_the_ctrl_c_handler_as_it_was() -> None:
    """dask-jobqueue's import sets a SIGINT handler that exits with status 0 (a Ctrl-C'd
    run would look successful); `backends._need` puts the process's own back. In a new
    interpreter, where dask-jobqueue is not imported yet; a plain import is the control."""
    check = (
        "import signal, sys\n"
        "from segpipe import backends\n"
        "before = signal.getsignal(signal.SIGINT)\n"
        "{imp}\n"
        "sys.exit(0 if signal.getsignal(signal.SIGINT) is before else 3)\n"
    )
    through = check.format(imp="backends._need('dask_jobqueue', 'dask-jobqueue', 'slurm')")
    plain = check.format(imp="import dask_jobqueue")
    assert subprocess.run([sys.executable, "-c", through], timeout=120).returncode == 0
    assert subprocess.run([sys.executable, "-c", plain], timeout=120).returncode == 3
