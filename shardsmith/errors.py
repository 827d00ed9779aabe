"""The one exception family of shardsmith.

Library code raises these; the command line turns any of them into one message on stderr and a
non-zero exit, and the TUI shows them in place. Each message names the file and the parameter
when they are known, so callers never have to add context by string matching.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, Path]


class ShardsmithError(Exception):
    """Base of every error shardsmith raises on bad input or a failed job."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        path: Optional[PathLike] = None,
        param: Optional[str] = None,
        hint: Optional[str] = None,
    ) -> None:
        self.message = message
        self.path = Path(path) if path is not None else None
        self.param = param
        self.hint = hint
        super().__init__(self.format())

    def format(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(f"{self.path}")
        if self.param is not None:
            parts.append(f"parameter '{self.param}'")
        where = ": ".join(parts)
        text = f"{where}: {self.message}" if where else self.message
        if self.hint:
            text = f"{text}. {self.hint}" if not text.endswith(".") else f"{text} {self.hint}"
        return text


class CheckpointFormatError(ShardsmithError):
    """A checkpoint file is empty, truncated, malformed or holds something that cannot be moved."""


class LayoutError(ShardsmithError):
    """A layout cannot be built: a dimension does not divide, a grid does not fit the world size."""


class PlanError(ShardsmithError):
    """A plan file is invalid: unknown strategy, unknown option, wrong option type."""


class RankSetError(ShardsmithError):
    """A rank set is incomplete or ambiguous: a missing rank, several checkpoints in one rank."""


class ValidationError(ShardsmithError):
    """The slices do not agree with the layout: shapes, dtypes, replicas or scalars differ."""


class OutputExistsError(ShardsmithError):
    """The output exists and --force was not given."""


class PluginError(ShardsmithError):
    """A strategy plugin is broken or a named strategy is not installed."""


class DistributedError(ShardsmithError):
    """A job inside msrun failed on some rank."""
