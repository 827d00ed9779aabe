"""A bounded run of each fuzzer: a crash, hang or memory blow-up on any input fails the test.

Longer runs are a manual step (see fuzz/README.md); this keeps the harnesses working and
replays the corpus on every change.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
SECONDS = int(os.environ.get("SHARDSMITH_FUZZ_SECONDS", "20"))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ckpt", "safetensors", "plan"])
def test_fuzzer_finds_nothing(tmp_path, target):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    command = [
        sys.executable,
        str(FUZZ / f"fuzz_{target}.py"),
        str(corpus),
        str(FUZZ / "corpus" / target),
        f"-max_total_time={SECONDS}",
        "-rss_limit_mb=1024",
        "-timeout=10",
        f"-artifact_prefix={tmp_path}/",
        f"-dict={FUZZ / f'{target}.dict'}",
    ]
    # libFuzzer's -rss_limit_mb reads the peak RSS, which Linux keeps across exec: a child started
    # straight from this process would start at pytest's peak (over 1 GB once MindSpore is
    # imported). A shell that forks the fuzzer from its own small image gives it a fresh peak.
    wrapped = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *command]
    result = subprocess.run(wrapped, capture_output=True, text=True, timeout=SECONDS + 120, cwd=tmp_path)
    findings = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    assert result.returncode == 0, result.stderr[-4000:]
    assert findings == []
