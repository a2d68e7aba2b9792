"""Exceptions raised by segpipe; every one is a `SegpipeError`."""

from __future__ import annotations


class SegpipeError(Exception):
    """Root of every error segpipe raises on purpose."""


class ConfigError(SegpipeError, ValueError):
    """A configuration value is missing or invalid."""


class InputNotFoundError(SegpipeError, FileNotFoundError):
    """An input path, glob or manifest entry does not exist."""


class InputReadError(SegpipeError, OSError):
    """An input file exists but cannot be read (truncated, corrupt, not an image)."""


class UnsupportedImageError(SegpipeError, ValueError):
    """An image has a dtype, shape or layout segpipe cannot segment."""


class OutputConflictError(SegpipeError, FileExistsError):
    """The output store already holds a different run."""


class SegmenterError(SegpipeError, ValueError):
    """Unknown segmenter or invalid segmenter parameters."""


class BlockFailedError(SegpipeError, RuntimeError):
    """Blocks whose tasks killed their workers repeatedly; the others finished."""


class OutputLockedError(SegpipeError, FileExistsError):
    """Another live run holds the output."""


class InputsError(SegpipeError, ValueError):
    """One or more inputs are bad (all of them listed)."""


class ImagesFailedError(SegpipeError, RuntimeError):
    """Some images failed under ``on_error: skip``; the others were segmented."""

    def __init__(self, message: str, rows: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.rows = rows or []

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.rows))


class OutputWriteError(SegpipeError, OSError):
    """The output cannot be written (disk full, read-only, permissions)."""


class NoSpaceError(SegpipeError, OSError):
    """The output's file system has less free space than the run needs."""


class ModelFileError(SegpipeError, ValueError):
    """A model file is missing, corrupt, or would run code when loaded."""


class TrainingDivergedError(SegpipeError, RuntimeError):
    """Training reached a loss that is not finite; no model is written."""


class SchedulerLostError(SegpipeError, ConnectionError):
    """The Dask scheduler of a run stopped answering; what finished is kept."""


class PrefectApiLostError(SegpipeError, ConnectionError):
    """The Prefect API of a run stopped answering; what finished is kept."""


class StorageAccessError(SegpipeError, PermissionError):
    """Object storage refuses this run's credentials, or cannot be reached."""
