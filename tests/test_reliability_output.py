"""Safe output: nothing partial is ever visible, inputs are never touched, manifests are right.

The interruption tests run the command line in a real process and stop it mid-write with SIGINT,
SIGTERM, SIGKILL or a full disk, then check what is left beside the target.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from reliability_support import listing, load, rank_file, save, save_rank_set, snapshot, write_plan
from shardsmith.cli import app

pytest.importorskip("mindspore")

runner = CliRunner()

ROW_W = '[[param]]\nmatch = "w*"\nstrategy = "row"\n'


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def small_set(tmp_path):
    w = np.arange(64, dtype=np.float32).reshape(16, 4)
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", w[:8]), ("b", "Float32", np.ones(4, np.float32))],
                                           [("w", "Float32", w[8:]), ("b", "Float32", np.ones(4, np.float32))]])
    return src, write_plan(tmp_path / "plan.toml", 2, ROW_W), w


# -- overwriting ------------------------------------------------------------------------------


def test_merge_refuses_overwrite_without_force(tmp_path, small_set):
    src, plan, w = small_set
    out = tmp_path / "out.ckpt"
    out.write_bytes(b"precious")
    result = invoke("merge", src, "--plan", plan, "-o", out, "-q")
    assert result.exit_code == 1
    assert "output exists" in result.stderr
    assert "--force" in result.stderr
    assert out.read_bytes() == b"precious"
    result = invoke("merge", src, "--plan", plan, "-o", out, "-q", "--force")
    assert result.exit_code == 0, result.output
    assert load(out)["w"][2] == w.tobytes()
    assert [p for p in listing(tmp_path) if ".shardsmith-" in p] == []


def test_split_refuses_nonempty_dir_without_force(tmp_path, small_set):
    src, plan, w = small_set
    merged = tmp_path / "merged.ckpt"
    assert invoke("merge", src, "--plan", plan, "-o", merged, "-q").exit_code == 0
    out = tmp_path / "out"
    assert invoke("split", merged, "--plan", plan, "-o", out, "-q", "--include", "b").exit_code == 0
    before = snapshot([out])
    result = invoke("split", merged, "--plan", plan, "-o", out, "-q")
    assert result.exit_code == 1
    assert "output exists" in result.stderr
    assert snapshot([out]) == before
    result = invoke("split", merged, "--plan", plan, "-o", out, "-q", "--force")
    assert result.exit_code == 0, result.output
    assert listing(out) == ["manifest.json", "rank_0", "rank_0/checkpoint_0.ckpt", "rank_1", "rank_1/checkpoint_1.ckpt"]
    assert [p for p in listing(tmp_path) if ".shardsmith-" in p] == []


def test_split_into_empty_dir_allowed(tmp_path, small_set):
    src, plan, w = small_set
    merged = tmp_path / "merged.ckpt"
    assert invoke("merge", src, "--plan", plan, "-o", merged, "-q").exit_code == 0
    (tmp_path / "out").mkdir()
    assert invoke("split", merged, "--plan", plan, "-o", tmp_path / "out", "-q").exit_code == 0
    assert load(rank_file(tmp_path / "out", 1))["w"][2] == w[8:].tobytes()


def test_force_never_replaces_an_input(tmp_path, small_set):
    src, plan, w = small_set
    before = snapshot([src])
    target = rank_file(src, 0)
    result = invoke("merge", src, "--plan", plan, "-o", target, "-q", "--force")
    assert result.exit_code == 1
    assert "replacing it would destroy the input" in result.stderr
    # A directory output that holds an input would delete it when replaced.
    result = invoke("reshard", src, "--plan", plan, "--to-plan", plan, "-o", src, "-q", "--force")
    assert result.exit_code == 1
    assert "contains the input" in result.stderr
    assert snapshot([src]) == before


# -- inputs are read-only ---------------------------------------------------------------------


def test_inputs_never_modified(tmp_path):
    w = np.arange(64, dtype=np.float32).reshape(16, 4)
    ranks = [[("w", "Float32", w[:8]), ("moments.w", "Float32", w[:8])], [("w", "Float32", w[8:]), ("moments.w", "Float32", w[8:])]]
    src = save_rank_set(tmp_path / "src", ranks)
    for rank in range(2):
        rank_file(src, rank).chmod(0o400)  # as MindSpore leaves its checkpoints
    plan = write_plan(tmp_path / "plan.toml", 2, ROW_W)
    plan.chmod(0o400)
    to_plan = write_plan(tmp_path / "to.toml", 4, ROW_W)
    before = snapshot([src, plan])
    time.sleep(0.01)  # so that any write would change the mtime
    commands = [
        ["inspect", src, "--json"],
        ["merge", src, "--plan", plan, "-o", tmp_path / "m.ckpt", "-q", "--verify"],
        ["merge", src, "--plan", plan, "-o", tmp_path / "d.ckpt", "-q", "--dry-run"],
        ["reshard", src, "--plan", plan, "--to-plan", to_plan, "-o", tmp_path / "r", "-q", "--verify"],
        ["split", tmp_path / "m.ckpt", "--plan", plan, "-o", tmp_path / "s", "-q"],
        ["verify", src, tmp_path / "s"],
    ]
    for command in commands:
        result = invoke(*command)
        assert result.exit_code == 0, (command, result.output)
    assert snapshot([src, plan]) == before


# -- manifests --------------------------------------------------------------------------------


def test_merge_manifest_hashes(tmp_path, small_set):
    src, plan, w = small_set
    out = tmp_path / "out.ckpt"
    assert invoke("merge", src, "--plan", plan, "-o", out, "-q").exit_code == 0
    manifest = json.loads((tmp_path / "out.ckpt.manifest.json").read_text())
    assert manifest["command"] == "merge"
    assert manifest["files"] == [{"path": "out.ckpt", "bytes": out.stat().st_size, "sha256": sha256(out)}]
    assert manifest["plan"]["sha256"] == sha256(plan)
    assert manifest["plan"]["text"] == plan.read_text()
    assert manifest["sources"] == [str(rank_file(src, 0)), str(rank_file(src, 1))]


def test_split_manifest_hashes(tmp_path, small_set):
    src, plan, w = small_set
    merged = tmp_path / "merged.ckpt"
    assert invoke("merge", src, "--plan", plan, "-o", merged, "-q").exit_code == 0
    out = tmp_path / "out"
    assert invoke("split", merged, "--plan", plan, "-o", out, "-q", "--verify").exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    files = {entry["path"]: entry for entry in manifest["files"]}
    assert sorted(files) == ["rank_0/checkpoint_0.ckpt", "rank_1/checkpoint_1.ckpt"]
    for path, entry in files.items():
        assert entry["sha256"] == sha256(out / path)
        assert entry["bytes"] == (out / path).stat().st_size
    assert manifest["plan"]["sha256"] == sha256(plan)


def test_force_replaces_stale_manifest(tmp_path, small_set):
    src, plan, w = small_set
    out = tmp_path / "out.ckpt"
    assert invoke("merge", src, "--plan", plan, "-o", out, "-q", "--include", "b").exit_code == 0
    assert invoke("merge", src, "--plan", plan, "-o", out, "-q", "--force").exit_code == 0
    manifest = json.loads((tmp_path / "out.ckpt.manifest.json").read_text())
    assert manifest["files"][0]["sha256"] == sha256(out)


# -- stopped mid-write ------------------------------------------------------------------------


def _cli(*args) -> list:
    return [sys.executable, "-m", "shardsmith.cli", *[str(a) for a in args]]


@pytest.fixture(scope="module")
def big_set(tmp_path_factory):
    """A rank set whose merge writes 256 MiB, long enough to be stopped in the middle."""
    root = tmp_path_factory.mktemp("big")
    rows = 2048
    ranks = []
    for rank in range(4):
        block = np.full((rows, 8192), rank, np.float32)
        ranks.append([("w0", "Float32", block), ("w1", "Float32", block + 0.5)])
    src = save_rank_set(root / "src", ranks)
    return src, write_plan(root / "plan.toml", 4, ROW_W)


def _stop_mid_write(command, temp_glob: str, directory: Path, stop) -> subprocess.CompletedProcess:
    """Start `command`, wait until its temporary output holds data, then call `stop(process)`."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "GLOG_v": "3"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        temps = list(directory.glob(temp_glob))
        sizes = [sum(f.stat().st_size for f in t.rglob("*") if f.is_file()) if t.is_dir() else t.stat().st_size for t in temps if t.exists()]
        if sizes and max(sizes) > 8 << 20:
            stop(process)
            break
        time.sleep(0.002)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, out.decode(), err.decode())


@pytest.mark.slow
@pytest.mark.parametrize(
    "how, code",
    [("SIGINT", 130), ("SIGTERM", 128 + signal.SIGTERM), ("SIGHUP", 128 + signal.SIGHUP)],
)
def test_signal_mid_merge_leaves_nothing(tmp_path, big_set, how, code):
    src, plan = big_set
    out = tmp_path / "out.ckpt"
    result = _stop_mid_write(_cli("merge", src, "--plan", plan, "-o", out, "-q"), ".out.ckpt.shardsmith-*.tmp", tmp_path,
                             lambda p: p.send_signal(getattr(signal, how)))
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert listing(tmp_path) == []


@pytest.mark.slow
def test_sigterm_mid_split_leaves_nothing(tmp_path, big_set):
    src, plan = big_set
    merged = tmp_path / "merged.ckpt"
    subprocess.run(_cli("merge", src, "--plan", plan, "-o", merged, "-q"), check=True, capture_output=True)
    result = _stop_mid_write(_cli("split", merged, "--plan", plan, "-o", tmp_path / "out", "-q"), ".out.shardsmith-*.tmp",
                             tmp_path, lambda p: p.send_signal(signal.SIGTERM))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert listing(tmp_path) == ["merged.ckpt", "merged.ckpt.manifest.json"]


@pytest.mark.slow
def test_kill_9_then_rerun_cleans_up(tmp_path, big_set):
    src, plan = big_set
    out = tmp_path / "out.ckpt"
    command = _cli("merge", src, "--plan", plan, "-o", out, "-q")
    result = _stop_mid_write(command, ".out.ckpt.shardsmith-*.tmp", tmp_path, lambda p: p.kill())
    assert result.returncode == -signal.SIGKILL
    # SIGKILL cannot be caught: the temporary stays, but under a name no reader takes for output.
    leftovers = listing(tmp_path)
    assert len(leftovers) == 1
    assert leftovers[0].startswith(".out.ckpt.shardsmith-")
    assert not out.exists()
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert listing(tmp_path) == ["out.ckpt", "out.ckpt.manifest.json"]
    assert subprocess.run(_cli("verify", out, out), capture_output=True).returncode == 0


@pytest.mark.slow
def test_kill_9_with_force_keeps_old_output(tmp_path, big_set):
    src, plan = big_set
    out_dir = tmp_path / "out"
    to_plan = write_plan(tmp_path / "to.toml", 2, ROW_W)
    command = _cli("reshard", src, "--plan", plan, "--to-plan", to_plan, "-o", out_dir, "-q")
    assert subprocess.run(command, capture_output=True).returncode == 0
    before = snapshot([out_dir])
    result = _stop_mid_write(command + ["--force"], ".out.shardsmith-*.tmp", tmp_path, lambda p: p.kill())
    assert result.returncode == -signal.SIGKILL
    assert snapshot([out_dir]) == before
    rerun = subprocess.run(command + ["--force"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert [p for p in listing(tmp_path) if ".shardsmith-" in p] == []


def test_old_directory_output_restored_after_crash(tmp_path, small_set):
    # A run killed between moving the old output aside and renaming the new one in leaves only
    # the old one, under a hidden name: the next run puts it back before deciding anything.
    src, plan, w = small_set
    out_dir = tmp_path / "out"
    assert invoke("reshard", src, "--plan", plan, "--to-plan", plan, "-o", out_dir, "-q").exit_code == 0
    before = {p.replace("out/", "", 1): v for p, v in snapshot([out_dir]).items()}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".out.shardsmith-{int(dead.stdout)}.old"
    out_dir.rename(aside)
    result = invoke("reshard", src, "--plan", plan, "--to-plan", plan, "-o", out_dir, "-q")
    assert result.exit_code == 1
    assert "output exists" in result.stderr
    assert not aside.exists()
    assert {p.replace("out/", "", 1): v for p, v in snapshot([out_dir]).items()} == before


def _run_with_file_size_limit(command, limit: int) -> subprocess.CompletedProcess:
    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        # Python ignores SIGXFSZ itself; make sure the child does too, so write() fails with EFBIG.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_file_size, env={**os.environ, "GLOG_v": "3"})


@pytest.mark.parametrize("kind", ["merge", "split"])
def test_file_size_limit_leaves_nothing(tmp_path, kind):
    w = np.arange(4 * 65536, dtype=np.float32).reshape(1024, 256)
    plan = write_plan(tmp_path / "plan.toml", 2, ROW_W)
    if kind == "merge":
        src = save_rank_set(tmp_path / "src", [[("w", "Float32", w[:512])], [("w", "Float32", w[512:])]])
        command = _cli("merge", src, "--plan", plan, "-o", tmp_path / "out" / "out.ckpt", "-q")
    else:
        src = save(tmp_path / "src" / "full.ckpt", [("w", "Float32", w)])
        command = _cli("split", src, "--plan", plan, "-o", tmp_path / "out" / "split", "-q")
    (tmp_path / "out").mkdir()
    result = _run_with_file_size_limit(command, 256 * 1024)
    assert result.returncode == 1, result.stderr
    assert "writing the output failed: File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert listing(tmp_path / "out") == []
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs, or a skip where mounting is not allowed (it needs root)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_leaves_nothing(tmp_path, small_tmpfs):
    w = np.arange(4 * 65536, dtype=np.float32).reshape(1024, 256)
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", w[:512])], [("w", "Float32", w[512:])]])
    plan = write_plan(tmp_path / "plan.toml", 2, ROW_W)
    result = invoke("merge", src, "--plan", plan, "-o", small_tmpfs / "out.ckpt", "-q")
    assert result.exit_code == 1, result.output
    assert os.strerror(errno.ENOSPC) in result.stderr
    assert listing(small_tmpfs) == []
    result = invoke("reshard", src, "--plan", plan, "--to-plan", plan, "-o", small_tmpfs / "split", "-q")
    assert result.exit_code == 1, result.output
    assert os.strerror(errno.ENOSPC) in result.stderr
    assert listing(small_tmpfs) == []


@pytest.mark.slow
@pytest.mark.parametrize("how", ["rename", "touch"])
def test_input_rewritten_mid_merge_fails(tmp_path, big_set, how):
    src, plan = big_set
    victim = rank_file(src, 3)

    def rewrite(process):
        # As a training job saving again would: MindSpore writes a new file and renames it over.
        if how == "rename":
            copy = victim.with_name(victim.name + ".new")
            copy.write_bytes(victim.read_bytes())
            os.replace(copy, victim)
        else:
            os.utime(victim)

    result = _stop_mid_write(_cli("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q"), ".out.ckpt.shardsmith-*.tmp", tmp_path, rewrite)
    assert result.returncode == 1, result.stderr
    assert "input changed while it was read" in result.stderr
    assert str(victim) in result.stderr
    assert listing(tmp_path) == []


def test_duplicate_rank_directories_rejected(tmp_path, small_set):
    src, plan, w = small_set
    (src / "rank_01").mkdir()
    save(src / "rank_01" / "checkpoint_1.ckpt", [("w", "Float32", w[8:]), ("b", "Float32", np.ones(4, np.float32))])
    result = invoke("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q")
    assert result.exit_code == 1
    assert "rank_01/ and rank_1/ are both rank 1" in result.stderr
