"""A real ``dask worker`` in which segpipe cannot be imported, as on a worker from another
environment (an image or virtualenv without it). Arguments: those of ``dask worker``."""

import importlib.abc
import sys


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name.split(".")[0] in ("segpipe", "flows"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, _Hide())
if __name__ == "__main__":
    from distributed.cli.dask_worker import main

    sys.exit(main())
