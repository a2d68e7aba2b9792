"""Write requirements-cpu.txt and requirements-cuda.txt from constraints.txt.

The images install what ``pip install '.[deep,cluster]'`` needs at run time, each
package at the version constraints.txt pins (the versions the tests ran with).
pip resolves the set (``--dry-run --report``, nothing installed); torch is the only
line that differs between the two files: the CPU build from PyTorch's CPU index, or
the CUDA build (PyPI's Linux x86_64 torch wheel, which pulls the CUDA libraries).

Run from the repository root:  .venv/bin/python deploy/docker/make_requirements.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
EXTRAS = "deep,cluster"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def norm(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, tuple[str, str]]:
    """``{normalised name: (name as written, version)}`` of a pip-freeze style file."""
    out: dict[str, tuple[str, str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            out[norm(name)] = (name.strip(), version.strip())
    return out


def runtime_names() -> set[str]:
    """Projects pip installs for ``.[deep,cluster]`` under constraints.txt (dry run)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--dry-run",
                "--ignore-installed",
                "--no-build-isolation",
                "--report",
                str(report),
                "-c",
                str(ROOT / "constraints.txt"),
                f"{ROOT}[{EXTRAS}]",
            ],
            check=True,
        )
        data = json.loads(report.read_text(encoding="utf-8"))
    return {norm(item["metadata"]["name"]) for item in data["install"]} - {"segpipe"}


def write(flavour: str, lines: list[str], torch_lines: list[str]) -> None:
    header = [
        f"# segpipe runtime for the {flavour} image: generated from constraints.txt by",
        "# deploy/docker/make_requirements.py; every pin equals constraints.txt's.",
        *torch_lines,
    ]
    path = HERE / f"requirements-{flavour}.txt"
    path.write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({len(lines)} pins)")


def main() -> None:
    constraints = pins(ROOT / "constraints.txt")
    names = runtime_names()
    missing = sorted(n for n in names if n not in constraints and n != "setuptools")
    if missing:
        sys.exit(f"not pinned in constraints.txt: {', '.join(missing)}")
    lines = sorted(
        (f"{constraints[n][0]}=={constraints[n][1]}" for n in names if n in constraints),
        key=str.lower,
    )
    torch_version = constraints["torch"][1]
    others = [line for line in lines if norm(line.split("==")[0]) != "torch"]
    write(
        "cpu",
        [f"torch=={torch_version}", *others],
        [f"--extra-index-url {CPU_INDEX}"],
    )
    write(
        "cuda",
        [f"torch=={torch_version.split('+')[0]}", *others],
        ["# torch: PyPI's Linux wheel is the CUDA build (CUDA libraries come as wheels)."],
    )


if __name__ == "__main__":
    main()
