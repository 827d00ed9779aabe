"""Building real MindSpore checkpoints and rank sets for the reliability tests.

Every file here is written by `mindspore.save_checkpoint`, so the tests read what a training
job leaves behind, and `load` reads results back with `mindspore.load_checkpoint`, the oracle.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Entry = Tuple[str, str, np.ndarray]  # (name, MindSpore dtype name, storage array)


def bfloat16_words(values) -> np.ndarray:
    """Return the bfloat16 words of float32 values that bfloat16 represents exactly."""
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype("<u2")


def to_tensor(dtype: str, array: np.ndarray):
    import mindspore as ms
    from mindspore.common import dtype as mstype

    if dtype == "BFloat16":
        as_float = (np.asarray(array).astype(np.uint32) << 16).view(np.float32)
        return ms.Tensor(as_float, dtype=mstype.bfloat16)
    return ms.Tensor(np.asarray(array))


def save(path: Path, entries: Iterable[Entry], fmt: str = "ckpt", append: Optional[dict] = None) -> Path:
    """Write `entries` with mindspore.save_checkpoint; return the file's path."""
    import mindspore as ms

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_list = [{"name": name, "data": to_tensor(dtype, array)} for name, dtype, array in entries]
    if fmt == "safetensors":
        ms.save_checkpoint(save_list, str(path), format="safetensors", append_dict=append)
    else:
        ms.save_checkpoint(save_list, str(path), append_dict=append)
    # MindSpore leaves its files read-only (0400); tests that cut or damage them need write access.
    path.chmod(0o644)
    return path


def save_rank_set(
    directory: Path, ranks: Sequence[Iterable[Entry]], fmt: str = "ckpt", prefix: str = "checkpoint_"
) -> Path:
    """Write one file per rank as `directory/rank_<r>/<prefix><r>.<fmt>`; return `directory`."""
    for rank, entries in enumerate(ranks):
        save(Path(directory) / f"rank_{rank}" / f"{prefix}{rank}.{fmt}", entries, fmt)
    return Path(directory)


def rank_file(directory: Path, rank: int) -> Path:
    (found,) = [p for p in (Path(directory) / f"rank_{rank}").iterdir() if p.suffix in (".ckpt", ".safetensors")]
    return found


def write_plan(path: Path, world_size: int, rules: str = "") -> Path:
    path = Path(path)
    path.write_text(f"world_size = {world_size}\n\n{rules}")
    return path


def load(path: Path) -> Dict[str, Tuple[str, Tuple[int, ...], bytes]]:
    """Read a checkpoint with mindspore.load_checkpoint: name -> (dtype name, shape, raw bytes)."""
    import mindspore as ms

    path = Path(path)
    kwargs = {"format": "safetensors"} if path.suffix == ".safetensors" else {}
    result = {}
    for name, param in ms.load_checkpoint(str(path), **kwargs).items():
        if isinstance(param, str):
            result[name] = ("str", (0,), param.encode())
            continue
        dtype = str(param.dtype)
        if dtype == "BFloat16":
            words = bfloat16_words(param.astype(ms.float32).asnumpy())
            result[name] = (dtype, tuple(param.shape), words.tobytes())
        else:
            result[name] = (dtype, tuple(param.shape), param.asnumpy().tobytes())
    return result


def snapshot(paths: Iterable[Path]) -> Dict[str, Tuple[int, int, str]]:
    """Return path -> (mtime_ns, mode, sha256) of every file under `paths`, to prove they stay untouched."""
    result = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            result[str(p)] = (st.st_mtime_ns, st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return result


def listing(directory: Path) -> List[str]:
    """Return every path under `directory`, hidden temporaries included, relative and sorted."""
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


def tree_without(directory: Path, *names: str) -> List[str]:
    return [p for p in listing(directory) if not any(p == n or p.startswith(n + os.sep) for n in names)]
