"""deploy/ validated without a Docker daemon or a Kubernetes cluster: compose structure
(and `docker compose config` where a compose CLI runs), the DaskCluster against the CRD
dask-kubernetes ships, the other manifests against the Kubernetes client's models,
prefect.yaml as `prefect deploy` reads it, Dockerfiles, requirements vs constraints.txt."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
WORK_POOL = "segpipe-process"
SECRET_ENV = ("PASSWORD", "AUTH_STRING")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            out[_norm(name)] = version.strip()
    return out


# --- Kubernetes: CRD schemas and client models ------------------------------------------


def _strict(schema: Any) -> Any:
    """A CRD schema as the API server applies it with strict field validation: fields
    it does not declare are errors (not silently pruned)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of a dask-kubernetes CRD (``DaskCluster``, ``DaskWorkerGroup``),
    from the CRD YAML in the installed package, with the fields every object has."""
    import dask_kubernetes

    pkg = Path(dask_kubernetes.__file__).parent
    for path in pkg.rglob("crds/*.yaml"):  # the Helm chart's CRDs: full pod schemas
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 10x faster on 280 kB
        crd = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        if crd["spec"]["names"]["kind"] == kind:
            version = crd["spec"]["versions"][0]
            schema = _strict(version["schema"]["openAPIV3Schema"])
            schema["properties"].update(
                apiVersion={"const": f"{crd['spec']['group']}/{version['name']}"},
                kind={"const": kind},
                metadata={"type": "object"},
            )
            schema["required"] = [*schema.get("required", []), "apiVersion", "kind", "metadata"]
            return dict(schema)
    raise AssertionError(f"no CRD for {kind} under {pkg}")


@cache
def _crd_validator(kind: str) -> Any:
    import jsonschema

    # Built once: checking the 280 kB schema itself (jsonschema.validate) takes seconds.
    return jsonschema.Draft7Validator(crd_schema(kind))


def validate_crd(resource: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``resource`` fits its CRD."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_crd_validator(resource["kind"]).iter_errors(resource))
    if error is not None:
        raise error


def _model_errors(data: Any, type_name: str, path: str) -> Iterator[str]:
    """Unknown fields and missing required ones, by the Kubernetes client's models."""
    import kubernetes.client as k8s

    if type_name.startswith("list["):
        for i, item in enumerate(data or []):
            yield from _model_errors(item, type_name[5:-1], f"{path}[{i}]")
        return
    if type_name.startswith("dict(") or not hasattr(k8s, type_name):
        return  # maps and primitives (str, int, object): the types the API takes freely
    model = getattr(k8s, type_name)
    if not isinstance(data, dict):
        yield f"{path}: expected a mapping for {type_name}, got {data!r}"
        return
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    for key, value in data.items():
        if key not in by_key:
            yield f"{path}.{key}: not a field of {type_name}"
        else:
            yield from _model_errors(value, model.openapi_types[by_key[key]], f"{path}.{key}")


def validate_builtin(resource: dict[str, Any]) -> list[str]:
    """Problems of a built-in resource (Deployment, Role, Service, ...)."""
    import kubernetes.client as k8s

    version = resource["apiVersion"].split("/")[-1]
    type_name = f"{version[:1].upper()}{version[1:]}{resource['kind']}"  # V1Deployment
    problems = list(_model_errors(resource, type_name, ""))
    try:  # the models' setters refuse a missing required field
        k8s.ApiClient()._ApiClient__deserialize(resource, type_name)
    except ValueError as err:
        problems.append(str(err))
    return problems


def _docs(name: str) -> list[dict[str, Any]]:
    text = (DEPLOY / "kubernetes" / name).read_text(encoding="utf-8")
    return [d for d in yaml.safe_load_all(text) if d]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _args(group: dict[str, Any]) -> list[str]:
    return [str(a) for a in group["spec"]["containers"][0]["args"]]


def _validate(docs: list[dict[str, Any]]) -> None:
    """Each manifest against its schema: dask-kubernetes' CRDs, or Kubernetes' own."""
    for doc in docs:
        if doc["apiVersion"].startswith("kubernetes.dask.org/"):
            validate_crd(doc)
        else:
            assert validate_builtin(doc) == []


def test_daskcluster_manifest_fits_the_crds() -> None:
    docs = _docs("daskcluster.yaml")
    assert {d["kind"] for d in docs} == {"DaskCluster", "DaskWorkerGroup", "Service"}
    _validate(docs)
    cluster = _one(docs, "DaskCluster")
    gpu = _one(docs, "DaskWorkerGroup")
    assert gpu["spec"]["cluster"] == cluster["metadata"]["name"]
    container = gpu["spec"]["worker"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = _args(gpu["spec"]["worker"])
    assert args[:2] == ["dask", "worker"]
    assert args[args.index("--resources") + 1] == "GPU=1"
    cpu_args = _args(cluster["spec"]["worker"])
    assert "--resources" not in cpu_args
    # TLS on every Dask process; the workers name the TLS address of the scheduler
    scheduler_args = _args(cluster["spec"]["scheduler"])
    assert scheduler_args[:2] == ["dask", "scheduler"]
    assert scheduler_args[scheduler_args.index("--protocol") + 1] == "tls"
    for args in (scheduler_args, cpu_args, _args(gpu["spec"]["worker"])):
        assert {"--tls-ca-file", "--tls-cert", "--tls-key"} <= set(args)
    for args in (cpu_args, _args(gpu["spec"]["worker"])):
        assert args[2] == f"tls://{cluster['metadata']['name']}-scheduler:8786"
    assert cluster["spec"]["scheduler"]["service"]["type"] == "ClusterIP"
    alias = _one(docs, "Service")
    assert alias["metadata"]["name"] == "scheduler"  # prefect.yaml's tls://scheduler:8786
    assert alias["spec"]["selector"] == cluster["spec"]["scheduler"]["service"]["selector"]


def test_crd_validation_catches_mistakes() -> None:
    import jsonschema

    cluster = _one(_docs("daskcluster.yaml"), "DaskCluster")
    typo = json.loads(json.dumps(cluster))
    typo["spec"]["worker"]["replica"] = typo["spec"]["worker"].pop("replicas")
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate_crd(typo)
    number = json.loads(json.dumps(cluster))  # quantities are strings in the CRD
    number["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(number)
    no_image = json.loads(json.dumps(cluster))
    del no_image["spec"]["scheduler"]["service"]
    with pytest.raises(jsonschema.ValidationError, match="service"):
        validate_crd(no_image)


def test_prefect_worker_manifest() -> None:
    docs = _docs("prefect-worker.yaml") + _docs("storage.yaml")
    kinds = {d["kind"] for d in docs}
    assert kinds == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "PersistentVolumeClaim",
    }
    for doc in docs:
        assert validate_builtin(doc) == [], doc["kind"]
    account = _one(docs, "ServiceAccount")["metadata"]["name"]
    binding = _one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == _one(docs, "Role")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    rules = _one(docs, "Role")["rules"]
    assert any("daskclusters" in r["resources"] for r in rules)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
    container = pod["containers"][0]
    args = container["args"]
    assert args[:3] == ["prefect", "worker", "start"]
    assert args[args.index("--pool") + 1] == WORK_POOL
    assert args[args.index("--type") + 1] == "process"
    env = {e["name"]: e for e in container["env"]}
    # the auth string comes from a Secret, never inline
    assert "value" not in env["PREFECT_API_AUTH_STRING"]
    assert env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"] == "prefect-auth"
    # the TLS files where prefect.yaml's `security` expects them
    (tls,) = [v for v in pod["volumes"] if v["name"] == "dask-tls"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "dask-tls"]
    security = _nightly()["parameters"]["config"]["security"]
    files = {f"{mount['mountPath']}/{i['path']}" for i in tls["secret"]["items"]}
    assert files == set(security.values())


def _secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Environment variables read from Secrets: name -> (secret, key)."""
    out = {}
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert "value" not in entry, entry
            out[entry["name"]] = (ref["name"], ref["key"])
    return out


def test_object_storage_variant() -> None:
    """daskcluster-s3.yaml: no shared volume, the workers' credentials by reference to the
    Secret of s3-credentials.example.yaml (placeholders only); the Prefect worker reads
    the same Secret (optional there, so the volume variant runs without it)."""
    (secret,) = _docs("s3-credentials.example.yaml")
    assert secret["kind"] == "Secret" and validate_builtin(secret) == []
    assert set(secret["stringData"].values()) == {"change-me"}  # placeholders, not secrets
    keys = {(secret["metadata"]["name"], key) for key in secret["stringData"]}
    assert {key for _, key in keys} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

    docs = _docs("daskcluster-s3.yaml")
    assert {d["kind"] for d in docs} == {"DaskCluster", "Service"}
    _validate(docs)
    cluster = _one(docs, "DaskCluster")
    assert "persistentVolumeClaim" not in json.dumps(cluster)
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    refs = _secret_refs(worker)
    assert set(refs.values()) == keys and set(refs) == {k for _, k in keys}
    scheduler = cluster["spec"]["scheduler"]["spec"]["containers"][0]
    assert _secret_refs(scheduler) == {} and "envFrom" not in scheduler
    assert (
        _one(docs, "Service")["spec"]["selector"]
        == cluster["spec"]["scheduler"]["service"]["selector"]
    )
    # TLS as in the volume variant
    assert {"--tls-ca-file", "--tls-cert", "--tls-key"} <= set(_args(cluster["spec"]["worker"]))

    prefect = _one(_docs("prefect-worker.yaml"), "Deployment")
    container = prefect["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "segpipe-s3", "optional": True}} in container["envFrom"]


def test_object_storage_run_file() -> None:
    """run-s3.yaml is a valid run file whose DaskCluster fits the CRD and references the
    example Secret's keys."""
    from segpipe.backends import kubernetes_cluster_spec
    from segpipe.config import RunConfig

    data = yaml.safe_load((DEPLOY / "kubernetes" / "run-s3.yaml").read_text(encoding="utf-8"))
    data["segmenter"] = {"name": data["segmenter"]}  # as load_config reads `segmenter: otsu`
    config = RunConfig(**data)
    assert str(config.input).startswith("s3://") and str(config.output).startswith("s3://")
    assert config.storage is not None and config.storage.endpoint
    assert config.cluster == "kubernetes"
    spec = kubernetes_cluster_spec(config)
    validate_crd(spec)
    worker_pod = spec["spec"]["worker"]["spec"]
    (secret,) = _docs("s3-credentials.example.yaml")
    refs = _secret_refs(worker_pod["containers"][0])
    assert set(refs.values()) == {(secret["metadata"]["name"], k) for k in secret["stringData"]}
    assert [v["name"] for v in worker_pod["volumes"]] == ["scratch"]
    assert "AWS_" not in json.dumps(spec["spec"]["scheduler"])


def test_builtin_validation_catches_mistakes() -> None:
    deployment = _one(_docs("prefect-worker.yaml"), "Deployment")
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["envv"] = []
    assert any("envv" in p for p in validate_builtin(typo))
    missing = json.loads(json.dumps(deployment))
    del missing["spec"]["selector"]
    assert any("selector" in p for p in validate_builtin(missing))


# --- compose ------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")))


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def test_compose_stack_structure() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "prefect-server",
        "scheduler",
        "cpu-worker",
        "gpu-worker",
        "prefect-worker",
        "register",
    }
    for name, service in services.items():
        assert "image" in service, name
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert context == ROOT, name
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
        if name != "register":  # long-running services report their health
            assert "healthcheck" in service, name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)  # loopback only
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in server["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "PREFECT_SERVER_API_AUTH_STRING" in server
    for client in ("prefect-worker", "register"):
        env = services[client]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert "PREFECT_API_AUTH_STRING" in env
    worker = _command(services["prefect-worker"])
    assert worker[worker.index("--pool") + 1] == WORK_POOL
    assert worker[worker.index("--type") + 1] == "process"
    register = _command(services["register"])
    assert register[register.index("--prefect-file") + 1] == "deploy/prefect.yaml"


def test_compose_secrets_come_from_the_environment() -> None:
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith(SECRET_ENV):
                # ${VAR:?message}: compose refuses to start without it; no default value
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (name, key)
            if key == "PREFECT_API_DATABASE_CONNECTION_URL":
                assert ":${POSTGRES_PASSWORD:?" in value, name
    example = (DEPLOY / ".env.example").read_text(encoding="utf-8")
    assert "change-me" in example  # placeholders, not secrets
    ignored = subprocess.run(
        ["git", "check-ignore", "deploy/.env", "deploy/tls/dask-key.pem"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    # a real .env and the keys never get committed
    assert ignored.stdout.split() == ["deploy/.env", "deploy/tls/dask-key.pem"]


def test_compose_dask_tls_and_gpu_worker() -> None:
    compose = _compose()
    services = compose["services"]
    tls_files = {
        "--tls-ca-file": "/run/secrets/dask_ca",
        "--tls-cert": "/run/secrets/dask_cert",
        "--tls-key": "/run/secrets/dask_key",
    }
    scheduler = _command(services["scheduler"])
    assert scheduler[:2] == ["dask", "scheduler"]
    assert scheduler[scheduler.index("--protocol") + 1] == "tls"
    for name in ("scheduler", "cpu-worker", "gpu-worker"):
        command = _command(services[name])
        for flag, path in tls_files.items():
            assert command[command.index(flag) + 1] == path, name
        assert set(services[name]["secrets"]) == {"dask_ca", "dask_cert", "dask_key"}
    for name in ("cpu-worker", "gpu-worker"):
        assert _command(services[name])[2] == "tls://scheduler:8786"
    gpu = _command(services["gpu-worker"])
    assert gpu[gpu.index("--resources") + 1] == "GPU=1"
    assert "--resources" not in _command(services["cpu-worker"])
    (device,) = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["gpu-worker"]["build"]["dockerfile"].endswith("Dockerfile.cuda")
    # make-certs.sh writes the files the secrets name
    script = (DEPLOY / "tls" / "make-certs.sh").read_text(encoding="utf-8")
    for secret in compose["secrets"].values():
        path = (COMPOSE.parent / secret["file"]).resolve()
        assert path.parent == DEPLOY / "tls"
        assert path.name in script


def _compose_cli() -> list[str] | None:
    """`docker compose` (the v2 plugin) or `docker-compose`, if one runs here."""
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) is None:
            continue
        probe = subprocess.run([*cli, "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return cli
    return None


def test_compose_config_with_the_compose_cli(tmp_path: Path) -> None:
    """The compose CLI parses and interpolates the file; it needs no daemon for that."""
    cli = _compose_cli()
    assert cli is not None, "needs docker compose or docker-compose (.ci/run installs it)"
    env = {**os.environ, "POSTGRES_PASSWORD": "test-only", "PREFECT_AUTH_STRING": "a:test-only"}
    env.pop("DOCKER_HOST", None)
    ok = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config"], env=env, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    rendered = yaml.safe_load(ok.stdout)
    assert {"scheduler", "gpu-worker", "prefect-worker"} <= set(rendered["services"])
    without = {k: v for k, v in env.items() if k not in ("POSTGRES_PASSWORD",)}
    refused = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"],
        env=without,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "POSTGRES_PASSWORD" in refused.stderr


def test_make_certs_gives_certificates_dask_accepts(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster
    from distributed.security import Security

    shutil.copy(DEPLOY / "tls" / "make-certs.sh", tmp_path)
    subprocess.run(["bash", str(tmp_path / "make-certs.sh")], check=True, capture_output=True)
    security = Security(
        tls_ca_file=str(tmp_path / "ca.pem"),
        tls_scheduler_cert=str(tmp_path / "dask.pem"),
        tls_scheduler_key=str(tmp_path / "dask-key.pem"),
        tls_worker_cert=str(tmp_path / "dask.pem"),
        tls_worker_key=str(tmp_path / "dask-key.pem"),
        tls_client_cert=str(tmp_path / "dask.pem"),
        tls_client_key=str(tmp_path / "dask-key.pem"),
        require_encryption=True,
    )
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            protocol="tls",
            host="127.0.0.1",
            security=security,
            dashboard_address=None,
        ) as cluster,
        Client(cluster.scheduler_address, security=security) as client,
    ):
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert client.submit(sum, [1, 2]).result() == 3


# --- prefect.yaml -------------------------------------------------------------------------


def _prefect_yaml() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "prefect.yaml").read_text(encoding="utf-8")))


def _nightly() -> dict[str, Any]:
    (nightly,) = [d for d in _prefect_yaml()["deployments"] if d["name"] == "nightly"]
    return dict(nightly)


def test_prefect_yaml_declares_the_nightly_deployment() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` reads
    from prefect.client.schemas.schedules import CronSchedule

    from segpipe.config import RunConfig

    model = PrefectYamlModel.model_validate(_prefect_yaml())
    (deployment,) = [d for d in model.deployments if d.name == "nightly"]
    assert deployment.entrypoint == "flows/segment.py:segment_collection"
    path, func = deployment.entrypoint.split(":")
    assert re.search(rf"^def {func}\(", (ROOT / path).read_text(encoding="utf-8"), re.M)
    assert deployment.work_pool is not None and deployment.work_pool.name == WORK_POOL
    (schedule,) = deployment.schedules or []
    assert schedule.cron == "0 2 * * *"
    assert schedule.timezone
    CronSchedule(cron=schedule.cron, timezone=schedule.timezone)  # a valid cron and zone
    config = RunConfig(**deployment.parameters["config"])  # every key a RunConfig field
    assert config.cluster == "tls://scheduler:8786" and config.security is not None
    assert config.prefect is None  # secrets stay out of parameters (shown in the UI)
    (pull,) = model.pull or []
    directory = pull["prefect.deployments.steps.set_working_directory"]["directory"]
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):  # where the images keep it
        assert f"WORKDIR {directory}" in (DEPLOY / "docker" / dockerfile).read_text()


def test_prefect_yaml_parameters_fit_the_flow_signature() -> None:
    import jsonschema
    from prefect.utilities.callables import parameter_schema

    from flows.segment import segment_collection

    schema = parameter_schema(segment_collection.fn).model_dump_for_openapi()
    jsonschema.validate(_nightly()["parameters"], schema)


@pytest.mark.integration
def test_prefect_deploy_registers_the_nightly_schedule(tmp_path: Path) -> None:
    """`prefect deploy` of deploy/prefect.yaml against a real server that demands an
    auth string, as the compose stack's `register` service runs it."""
    import httpx

    from tests.helpers import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    auth = ("admin", "test-only")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**env, "PREFECT_SERVER_API_AUTH_STRING": ":".join(auth)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", auth=auth, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and server.poll() is None, "prefect server did not start"
            time.sleep(0.5)
        # the pool the worker would create; `prefect deploy` requires it to exist
        pool = {"name": WORK_POOL, "type": "process"}
        assert httpx.post(f"{url}/work_pools/", json=pool, auth=auth, timeout=10).is_success
        client = {**env, "PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": ":".join(auth)}
        done = subprocess.run(
            [
                str(bin_dir / "prefect"),
                "--no-prompt",
                "deploy",
                "--all",
                "--prefect-file",
                "deploy/prefect.yaml",
            ],
            cwd=ROOT,
            env=client,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        (deployment,) = httpx.post(
            f"{url}/deployments/filter", json={}, auth=auth, timeout=10
        ).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    nightly = _nightly()
    assert deployment["name"] == "nightly"
    assert deployment["entrypoint"] == nightly["entrypoint"]
    assert deployment["work_pool_name"] == WORK_POOL
    (schedule,) = deployment["schedules"]
    assert schedule["active"] is True
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == nightly["schedules"][0]["timezone"]
    assert deployment["parameters"] == nightly["parameters"]


# --- images and requirements -----------------------------------------------------------


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_references_exist(flavour: str) -> None:
    text = (DEPLOY / "docker" / f"Dockerfile.{flavour}").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source  # the build context is the repo root
    assert [s for c in copies for s in c if "requirements" in s] == [
        f"deploy/docker/requirements-{flavour}.txt"
    ]
    base = next(ln for ln in lines if ln.startswith("FROM "))
    cmd = json.loads(next(ln for ln in lines if ln.startswith("CMD "))[4:])
    assert cmd[:2] == ["dask", "worker"]
    if flavour == "cuda":
        assert base.startswith("FROM nvidia/cuda:")
        assert cmd[cmd.index("--resources") + 1] == "GPU=1"
    else:
        assert "--resources" not in cmd
    assert any(ln.startswith("USER ") and ln != "USER root" for ln in lines)


def _instructions(dockerfile: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    out: list[str] = []
    pending = ""
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += " " + line.strip().removesuffix("\\").strip()
        if not line.rstrip().endswith("\\"):
            out.append(pending.strip())
            pending = ""
    return out


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_images_precompile_the_kernels(flavour: str) -> None:
    """The numba cache is filled at build time, as the user the containers run as, in a
    folder that stays writable (numba ignores a cache it cannot write), for a CPU level
    rather than the build machine's CPU (numba reuses a kernel only for the CPU it names)."""
    steps = _instructions(DEPLOY / "docker" / f"Dockerfile.{flavour}")
    (env,) = [s for s in steps if s.startswith("ENV NUMBA_CACHE_DIR=")]
    assert env.split()[1:] == [
        "NUMBA_CACHE_DIR=/opt/numba-cache",
        "NUMBA_CPU_NAME=${NUMBA_CPU_NAME}",
        'NUMBA_CPU_FEATURES=""',
    ]
    assert "ARG NUMBA_CPU_NAME=x86-64-v3" in steps
    install = next(i for i, s in enumerate(steps) if s.startswith("RUN pip install --no-deps ."))
    assert 'chown segpipe /data "$NUMBA_CACHE_DIR"' in steps[install]
    user = steps.index("USER segpipe")
    (precompile,) = [i for i, s in enumerate(steps) if "segpipe.precompile" in s]
    assert install < user < precompile
    # the installed copy (what Dask workers import) and the source copy (flow runs)
    assert steps[precompile] == (
        "RUN python -P -m segpipe.precompile && python -m segpipe.precompile"
    )
    assert steps.index(env) < install


def test_requirements_match_constraints() -> None:
    constraints = _pins(ROOT / "constraints.txt")
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    needed = project["dependencies"] + project["optional-dependencies"]["cluster"]
    for flavour in ("cpu", "cuda"):
        path = DEPLOY / "docker" / f"requirements-{flavour}.txt"
        pins = _pins(path)
        for name, version in pins.items():
            assert name in constraints, f"{path.name}: {name} is not in constraints.txt"
            expected = constraints[name]
            if name == "torch" and flavour == "cuda":
                expected = expected.split("+")[0]  # the same release, CUDA build
            assert version == expected, f"{path.name}: {name}=={version}, constraints {expected}"
        for requirement in [*needed, "torch"]:
            name = _norm(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])
            assert name in pins, f"{path.name} lacks {name}"
    assert _pins(DEPLOY / "docker" / "requirements-cpu.txt")["torch"].endswith("+cpu")
    cpu_text = (DEPLOY / "docker" / "requirements-cpu.txt").read_text(encoding="utf-8")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu_text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flavour", "python", "glibc"),
    # the images: python:3.11-slim-bookworm (glibc 2.36), Ubuntu 24.04 (Python 3.12.3,
    # glibc 2.39); full versions, as `Requires-Python: >3.11` excludes a bare "3.11"
    [("cpu", "3.11.14", 36), ("cuda", "3.12.3", 39)],
)
def test_requirements_resolve(flavour: str, python: str, glibc: int, tmp_path: Path) -> None:
    """pip resolves each file with its dependencies for the image's Python and platform
    (wheel metadata only, nothing installed): the pinned set is complete and coherent."""
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--retries",
            "0",  # an unreachable extra index (PyTorch's, offline) fails fast, not 5 times
            "--ignore-installed",
            "--only-binary=:all:",
            "--python-version",
            python,
            "--implementation",
            "cp",
            *(arg for platform in platforms for arg in ("--platform", platform)),
            "--target",
            str(tmp_path / "target"),
            "--report",
            str(tmp_path / "report.json"),
            "-r",
            str(DEPLOY / "docker" / f"requirements-{flavour}.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    resolved = {_norm(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    for name, version in _pins(DEPLOY / "docker" / f"requirements-{flavour}.txt").items():
        assert resolved[name] == version, name
