"""Shared fixtures: real checkpoints written by MindSpore, and the CLI through Typer's CliRunner."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Sequence, Tuple, Union

import numpy as np
import pytest

os.environ.setdefault("GLOG_v", "3")

# Tensor values given to `save_ms`: a numpy array (its dtype decides), or (array, MindSpore dtype
# name) to save as a dtype numpy has no type for, such as BFloat16.
TensorValue = Union[np.ndarray, Tuple[np.ndarray, str], str, int]


@pytest.fixture(scope="session")
def ms():
    """The mindspore module, the oracle (imported once per session: it costs about 1.3 s)."""
    import mindspore

    try:
        mindspore.set_device("CPU")
    except RuntimeError:
        # Another test already ran a MindSpore kernel; the device is set for good by then (CPU here).
        pass
    return mindspore


def save_ms(path: Path, tensors: Mapping[str, TensorValue], **kwargs) -> Path:
    """Save `tensors` with mindspore.save_checkpoint, in order, creating parent directories."""
    import mindspore

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = []
    append = {}
    for name, value in tensors.items():
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            append[name] = value
            continue
        if isinstance(value, tuple):
            array, dtype = value
            tensor = mindspore.Tensor(array, dtype=getattr(mindspore, dtype.lower()))
        else:
            tensor = mindspore.Tensor(value)
        items.append({"name": name, "data": tensor})
    mindspore.save_checkpoint(items, str(path), append_dict=append or None, **kwargs)
    return path


def load_ms(path: Path) -> Dict[str, np.ndarray]:
    """Load a checkpoint with mindspore.load_checkpoint as numpy arrays (BFloat16 as raw uint16)."""
    import mindspore

    result = {}
    for name, param in mindspore.load_checkpoint(str(path)).items():
        if param.dtype == mindspore.bfloat16:
            result[name] = param.view(mindspore.uint16).asnumpy() if hasattr(param, "view") else param.float().asnumpy()
        else:
            result[name] = param.asnumpy()
    return result


def row_blocks(array: np.ndarray, parts: int, world_size: int) -> Sequence[np.ndarray]:
    """Rank r's slice of a row split: block r % parts along dim 0 (written out by hand, as the oracle)."""
    size = array.shape[0] // parts
    return [array[(r % parts) * size : (r % parts + 1) * size] for r in range(world_size)]


def write_rank_set(root: Path, per_rank: Sequence[Mapping[str, TensorValue]], name: str = "net.ckpt") -> Path:
    """Write one MindSpore checkpoint per rank under root/rank_<r>/."""
    for rank, tensors in enumerate(per_rank):
        save_ms(root / f"rank_{rank}" / name, tensors)
    return root


@pytest.fixture()
def cli():
    """Invoke the CLI in-process; returns the click Result (stdout in .stdout, stderr in .stderr)."""
    from typer.testing import CliRunner

    from shardsmith.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "120", "NO_COLOR": "1"})

    return invoke


@pytest.fixture()
def builtin_only(monkeypatch):
    """Run with the built-in strategies only, whatever plugins are installed."""
    from shardsmith import plugins

    monkeypatch.setenv(plugins.PLUGINS_ENV, "")
    plugins.reset_registry()
    yield
    plugins.reset_registry()


def write_plan(path: Path, text: str) -> Path:
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path
