"""Prefect flows and the ``segpipe`` command line: orchestration around the ``segpipe`` library.

Prefect reads its settings at import: defaults that keep a laptop run
self-contained are set here, before any flow module imports Prefect.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", str(Path.home() / ".segpipe" / "prefect"))
# Prefect creates its home without parents; an embedded API without it fails to start.
Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The embedded API migrates a new SQLite database at first start: on a busy
# 2-core machine that can exceed Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
