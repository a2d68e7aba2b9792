"""``segpipe cluster-spec``: what a SLURM or Kubernetes run would submit, printed, not submitted.

Registered on the CLI by `register`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segpipe.errors import SegpipeError

SPEC_EXAMPLES = """
[b]Examples[/b]

  segpipe cluster-spec --config run.yaml
  segpipe cluster-spec --config run.yaml --cluster slurm
  segpipe cluster-spec -c run.yaml --cluster kubernetes | kubectl apply -f -
"""


def cluster_spec(
    config: Annotated[Path, typer.Option("--config", "-c", help="run.yaml with the cluster.")],
    cluster: Annotated[
        str | None,
        typer.Option(help="slurm or kubernetes (default: the run file's `cluster`)."),
    ] = None,
) -> None:
    """Print the SLURM job script or the Kubernetes DaskCluster a run would submit."""
    import yaml

    from segpipe.backends import kubernetes_cluster_spec, slurm_job_script
    from segpipe.config import load_config

    try:
        cfg = load_config(config, {"cluster": cluster})
        if cfg.cluster == "slurm":
            text = slurm_job_script(cfg)
        elif cfg.cluster == "kubernetes":
            text = yaml.safe_dump(kubernetes_cluster_spec(cfg), sort_keys=False)
        else:
            raise SegpipeError(
                f"cluster {cfg.cluster!r} submits nothing: cluster-spec shows what "
                "--cluster slurm or --cluster kubernetes would submit."
            )
    except SegpipeError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    # Plain stdout (no rich markup): the output is meant for sbatch or kubectl.
    typer.echo(text.rstrip("\n"))


def register(app: typer.Typer) -> None:
    """Add the ``cluster-spec`` command to ``app``."""
    app.command("cluster-spec", epilog=SPEC_EXAMPLES)(cluster_spec)
