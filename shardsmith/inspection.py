"""What `shardsmith inspect` reports about a checkpoint or a rank set, as plain data.

Only headers are read (names, dtypes, shapes), so inspecting a large rank set costs milliseconds;
the layout column of a rank set is inferred from shapes and names, and from bytes only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .layout import Shape
from .rankset import open_source


@dataclass
class ParamReport:
    name: str
    dtype: str
    shape: Optional[Shape]  # the full shape, where it is known
    nbytes: int  # bytes of the full tensor where its shape is known, else None in JSON
    rank_shapes: Optional[List[Optional[Shape]]] = None  # one per rank; None where a rank lacks it
    rank_dtypes: Optional[List[Optional[str]]] = None  # set only when the ranks disagree
    slice_bytes: int = 0  # bytes all ranks' slices of it take together
    layout: Optional[str] = None
    layout_certain: Optional[bool] = None
    layout_reason: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape) if self.shape is not None else None,
            "nbytes": self.nbytes if self.shape is not None else None,
        }
        if self.rank_shapes is not None:
            data["rank_shapes"] = [list(s) if s is not None else None for s in self.rank_shapes]
            data["slice_bytes"] = self.slice_bytes
            if self.rank_dtypes is not None:
                data["rank_dtypes"] = self.rank_dtypes
            data["layout"] = self.layout
            data["layout_certain"] = self.layout_certain
            data["layout_reason"] = self.layout_reason
        return data


@dataclass
class InspectReport:
    paths: List[Path]
    world_size: int
    formats: List[str]
    params: List[ParamReport] = field(default_factory=list)

    @property
    def is_rank_set(self) -> bool:
        return self.world_size > 1

    def to_json(self) -> Dict[str, Any]:
        return {
            "kind": "rank_set" if self.is_rank_set else "checkpoint",
            "world_size": self.world_size,
            "files": [str(p) for p in self.paths],
            "formats": self.formats,
            "params": [p.to_json() for p in self.params],
        }


def inspect_paths(
    paths: Sequence[Path],
    *,
    select: Optional[str] = None,
    format: Optional[str] = None,
    like: Optional[Path] = None,
    compare_bytes: bool = False,
    cipher: Optional[Any] = None,
) -> InspectReport:
    """Read the headers of a checkpoint or a rank set and describe every parameter."""
    with open_source(paths, select, format, verify_crc=False, cipher=cipher) as source:
        report = InspectReport(list(source.paths), source.world_size, [r.format for r in source.readers])
        if source.world_size == 1:
            for info in source.infos():
                report.params.append(ParamReport(info.name, info.dtype, tuple(info.shape), info.nbytes))
            return report
        inferred: Dict[str, Any] = {}
        try:
            from .infer import infer_layouts
        except ImportError:  # pragma: no cover - infer ships with the package
            infer_layouts = None
        if infer_layouts is not None:
            inferred = infer_layouts(source, like=like, check_bytes=compare_bytes)
        for info in source.infos():
            held = [source.info(info.name, r) for r in range(source.world_size)]
            rank_shapes = [tuple(h.shape) if h is not None else None for h in held]
            rank_dtypes = [h.dtype if h is not None else None for h in held]
            guess = inferred.get(info.name)
            full = tuple(guess.full_shape) if guess is not None and getattr(guess, "full_shape", None) is not None else None
            nbytes = info.nbytes
            if full is not None and info.dtype != "str":
                from .dtypes import expected_nbytes

                nbytes = expected_nbytes(info.dtype, full)
            report.params.append(
                ParamReport(
                    info.name,
                    info.dtype,
                    full,
                    nbytes,
                    rank_shapes,
                    rank_dtypes if len(set(rank_dtypes)) > 1 else None,
                    sum(h.nbytes for h in held if h is not None),
                    guess.summary if guess is not None else None,
                    guess.certain if guess is not None else None,
                    guess.reason if guess is not None else None,
                )
            )
        return report
