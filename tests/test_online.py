"""shardsmith.online against the offline commands, with MindSpore as the oracle.

The model checkpoint below is written by `mindspore.save_checkpoint` and laid out by every
built-in strategy and the `fused_qkv` plugin, in Float32, Float16, BFloat16 (NaN payloads
included), Bool and Int4, with optimizer states, scalars and a str entry. Rank sets are made
from it by `shardsmith split`; what the online jobs write must equal, byte for byte, what the
offline commands write from the same inputs.

The tests marked slow launch real msrun jobs of CPU workers on 127.0.0.1. Most checks run in one
2-worker job whose workers run this file as a script (`python tests/test_online.py WORK`, see
`run_cases`); the others run the `shardsmith gather` command line. The fast tests run the same
code with a one-rank cluster, which needs no msrun.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import write_plan  # noqa: E402

from shardsmith import jobs  # noqa: E402
from shardsmith.engine import Selection  # noqa: E402
from shardsmith.errors import DistributedError, RankSetError, ShardsmithError  # noqa: E402
from shardsmith.online.cluster import Cluster, describe_failures  # noqa: E402
from shardsmith.online.distributed import distribute, file_layout, share_by_bytes  # noqa: E402
from shardsmith.online.gather import gather_files, own_rank_file  # noqa: E402

BIN = Path(sys.executable).parent
THIS = Path(__file__).resolve()

PLAN_4 = """
world_size = 4

[[param]]
match = "embedding.weight"
strategy = "row"

[[param]]
match = "fc1.weight"
strategy = "column"

[[param]]
match = "grid.weight"
strategy = "grid"
grid = [2, 2]

[[param]]
match = "tm.weight"
strategy = "tensor_map"
dev_matrix = [2, 2]
tensor_map = [1, -1]

[[param]]
match = "mask"
strategy = "row"
parts = 2

[[param]]
match = "quant.weight"
strategy = "row"

[[param]]
match = "attn.qkv.*"
strategy = "fused_qkv"
heads = 4

[[param]]
match = "large.weight"
strategy = "row"
"""

PLAN_2 = """
world_size = 2

[[param]]
match = "embedding.weight"
strategy = "column"

[[param]]
match = "fc1.weight"
strategy = "row"

[[param]]
match = "grid.weight"
strategy = "grid"
grid = [1, 2]

[[param]]
match = "tm.weight"
strategy = "tensor_map"
dev_matrix = [2]
tensor_map = [-1, 0]

[[param]]
match = "quant.weight"
strategy = "row"

[[param]]
match = "attn.qkv.*"
strategy = "fused_qkv"
heads = 4

[[param]]
match = "large.weight"
strategy = "row"
"""

PLAN_1 = "world_size = 1\n"


# -- inputs -------------------------------------------------------------------------------------


def model_tensors(seed: int = 0, large_rows: int = 512) -> Dict[str, Any]:
    """Return name -> mindspore.Tensor (or an append_dict value) of the test model, in file order."""
    import mindspore
    from mindspore.common import np_dtype

    rng = np.random.default_rng(seed)

    def f32(*shape):
        return mindspore.Tensor(rng.standard_normal(shape).astype(np.float32))

    def bf16(*shape):
        words = rng.integers(0, 2**16, shape, dtype=np.uint16)
        words.reshape(-1)[:2] = (0x7FC1, 0xFFFF)  # NaN payloads that a cast would lose
        return mindspore.Tensor(words.view(np_dtype.bfloat16))

    return {
        "large.weight": f32(large_rows, 64),
        "embedding.weight": f32(16, 8),
        "fc1.weight": bf16(8, 12),
        "grid.weight": mindspore.Tensor(rng.standard_normal((8, 8)).astype(np.float16)),
        "tm.weight": f32(8, 4),
        "mask": mindspore.Tensor(rng.integers(0, 2, (8, 4)).astype(bool)),
        "quant.weight": mindspore.Tensor(rng.integers(-128, 128, (8, 6)).astype(np.int8), dtype=mindspore.qint4x2),
        "attn.qkv.weight": f32(24, 8),
        "attn.qkv.bias": bf16(24),
        "norm.gamma": f32(8),
        "big.table": f32(64, 64),
        "moment1.embedding.weight": f32(16, 8),
        "moment1.fc1.weight": bf16(8, 12),
        "moment1.attn.qkv.weight": f32(24, 8),
        "global_step": mindspore.Tensor(np.array([7], np.int32)),
        "learning_rate": mindspore.Tensor(np.array(0.01, np.float32)),
        "epoch_num": 3,
        "note": "gathered by shardsmith",
    }


def save_model(path: Path, tensors: Dict[str, Any]) -> Path:
    import mindspore

    path.parent.mkdir(parents=True, exist_ok=True)
    items = [{"name": n, "data": t} for n, t in tensors.items() if not isinstance(t, (int, str))]
    append = {n: v for n, v in tensors.items() if isinstance(v, (int, str))}
    mindspore.save_checkpoint(items, str(path), append_dict=append or None)
    return path


def rank_file(rank_set: Path, rank: int) -> Path:
    (path,) = (rank_set / f"rank_{rank}").glob("*.ckpt")
    return path


def assert_same_files(actual: Path, expected: Path) -> None:
    """Assert two files, or two directory trees, hold the same files with the same bytes."""
    if expected.is_file():
        assert actual.read_bytes() == expected.read_bytes(), f"{actual} differs from {expected}"
        return
    names = sorted(str(p.relative_to(expected)) for p in expected.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(actual)) for p in actual.rglob("*") if p.is_file()) == names
    for name in names:
        assert (actual / name).read_bytes() == (expected / name).read_bytes(), f"{name} differs"


def manifest_of(path: Path) -> Dict[str, Any]:
    manifest = path / "manifest.json" if path.is_dir() else path.with_name(path.name + ".manifest.json")
    return json.loads(manifest.read_text())


def assert_same_manifest(actual: Path, expected: Path, command: str) -> None:
    """Assert two single-file outputs have the same manifest but for their file names and `command`."""
    ours = manifest_of(actual)
    theirs = manifest_of(expected)
    assert ours.pop("command") == command
    theirs.pop("command")
    for record in ours["files"] + theirs["files"]:
        record.pop("path")
    assert ours == theirs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Dict[str, Path]:
    """The model, its rank sets for 4 and 2 ranks, and the offline outputs the online jobs must equal."""
    root = tmp_path_factory.mktemp("online")
    paths = {
        "full": save_model(root / "full.ckpt", model_tensors()),
        "plan4": write_plan(root / "plan4.toml", PLAN_4),
        "plan2": write_plan(root / "plan2.toml", PLAN_2),
        "plan1": write_plan(root / "plan1.toml", PLAN_1),
    }
    jobs.split(paths["full"], paths["plan4"], root / "set4")
    jobs.split(paths["full"], paths["plan2"], root / "set2")
    paths["set4"] = root / "set4"
    paths["set2"] = root / "set2"
    paths["merged2"] = root / "merged2.ckpt"
    jobs.merge([paths["set2"]], paths["plan2"], paths["merged2"])
    paths["merged2_crc"] = root / "merged2_crc.ckpt"
    jobs.merge([paths["set2"]], paths["plan2"], paths["merged2_crc"], crc_check=True)
    paths["merged2_st"] = root / "merged2.safetensors"
    jobs.merge([paths["set2"]], paths["plan2"], paths["merged2_st"], selection=Selection(exclude=("note",)))
    paths["resharded"] = root / "resharded"
    jobs.reshard([paths["set4"]], paths["plan4"], paths["plan2"], paths["resharded"])
    return paths


# -- fast: one-rank cluster, no msrun -----------------------------------------------------------


def one_rank() -> Cluster:
    return Cluster(0, 1, all_gather=None)


def test_gather_one_rank_equals_merge(inputs, tmp_path):
    source = tmp_path / "set1"
    (source / "rank_0").mkdir(parents=True)
    shutil.copy(inputs["full"], source / "rank_0" / "net.ckpt")
    jobs.merge([source], inputs["plan1"], tmp_path / "merged.ckpt")

    gather_files(one_rank(), [source], inputs["plan1"], tmp_path / "gathered.ckpt", chunk_bytes=1024)

    assert_same_files(tmp_path / "gathered.ckpt", tmp_path / "merged.ckpt")
    assert_same_files(tmp_path / "gathered.ckpt", inputs["full"])
    assert_same_manifest(tmp_path / "gathered.ckpt", tmp_path / "merged.ckpt", "gather")


def test_gather_refuses_existing_output(inputs, tmp_path):
    target = tmp_path / "gathered.ckpt"
    target.write_bytes(b"keep")

    with pytest.raises(DistributedError, match="output exists"):
        gather_files(one_rank(), [inputs["full"]], inputs["plan1"], target)

    assert target.read_bytes() == b"keep"


def test_gather_plan_of_other_world_size(inputs, tmp_path):
    with pytest.raises(RankSetError, match="msrun started 1 workers but the plan .* has world_size 2"):
        gather_files(one_rank(), [inputs["full"]], inputs["plan2"], tmp_path / "gathered.ckpt")

    assert not (tmp_path / "gathered.ckpt").exists()


@pytest.mark.parametrize("kind", ["split", "reshard", "merge", "merge_crc", "merge_safetensors"])
def test_distribute_one_worker_equals_offline(inputs, tmp_path, kind):
    output = tmp_path / "out"
    if kind == "split":
        distribute(one_rank(), "split", [inputs["full"]], inputs["plan2"], output)
        assert_same_files(output, inputs["set2"])
    elif kind == "reshard":
        distribute(one_rank(), "reshard", [inputs["set4"]], inputs["plan4"], output, to_plan=inputs["plan2"])
        assert_same_files(output, inputs["resharded"])
    elif kind == "merge":
        distribute(one_rank(), "merge", [inputs["set2"]], inputs["plan2"], output.with_suffix(".ckpt"))
        assert_same_files(output.with_suffix(".ckpt"), inputs["merged2"])
        assert_same_manifest(output.with_suffix(".ckpt"), inputs["merged2"], "merge")
    elif kind == "merge_crc":
        distribute(one_rank(), "merge", [inputs["set2"]], inputs["plan2"], output.with_suffix(".ckpt"), crc_check=True)
        assert_same_files(output.with_suffix(".ckpt"), inputs["merged2_crc"])
    else:
        target = output.with_suffix(".safetensors")
        distribute(one_rank(), "merge", [inputs["set2"]], inputs["plan2"], target, selection=Selection(exclude=("note",)))
        assert_same_files(target, inputs["merged2_st"])


def test_load_rank_slice_equals_split(inputs, ms):
    from shardsmith.online import load_rank_slice

    for rank in range(2):
        expected = ms.load_checkpoint(str(rank_file(inputs["set2"], rank)))
        from_full = load_rank_slice(inputs["full"], inputs["plan2"], rank, 2)
        from_set4 = load_rank_slice(inputs["set4"], inputs["plan2"], rank, 2, source_plan=inputs["plan4"])
        assert parameter_differences(from_full, expected) == []
        assert parameter_differences(from_set4, expected) == []


def test_load_rank_slice_loads_into_network(inputs, ms):
    from shardsmith.online import load_rank_slice

    net = ms.nn.Cell()
    net.embedding_weight = ms.Parameter(ms.Tensor(np.zeros((16, 4), np.float32)), name="embedding.weight")
    loaded = load_rank_slice(inputs["full"], inputs["plan2"], 1, 2)

    not_loaded, _ = ms.load_param_into_net(net, loaded)

    assert not_loaded == []
    expected = ms.load_checkpoint(str(rank_file(inputs["set2"], 1)))["embedding.weight"].asnumpy()
    assert np.array_equal(net.embedding_weight.asnumpy(), expected)


def test_load_rank_slice_rank_set_needs_source_plan(inputs):
    from shardsmith.online import load_rank_slice

    with pytest.raises(RankSetError, match="pass source_plan="):
        load_rank_slice(inputs["set4"], inputs["plan2"], 0, 2)


def test_load_rank_slice_world_size_must_match_plan(inputs):
    from shardsmith.online import load_rank_slice

    with pytest.raises(ShardsmithError, match="world size 4 differs from the plan's world_size 2"):
        load_rank_slice(inputs["full"], inputs["plan2"], 0, 4)


def test_own_rank_file_reads_only_its_directory(tmp_path):
    (tmp_path / "rank_1").mkdir()
    (tmp_path / "rank_1" / "net.ckpt").write_bytes(b"x")

    assert own_rank_file([tmp_path], None, 1, 2) == tmp_path / "rank_1" / "net.ckpt"
    with pytest.raises(RankSetError, match="rank_0 is not found; each worker reads only its own"):
        own_rank_file([tmp_path], None, 0, 2)
    with pytest.raises(RankSetError, match="has rank_1 but msrun started 1 workers"):
        own_rank_file([tmp_path], None, 0, 1)


def test_describe_failures_groups_ranks():
    text = describe_failures([(1, "a"), (3, "a"), (2, "b")], 4)

    assert text == "rank 1, 3: a; rank 2: b"
    assert describe_failures([(0, "a"), (1, "a")], 2) == "every rank: a"


def test_int64_never_crosses_allgather():
    # The CPU AllGather narrows Int64 and Float64 (checked with MindSpore 2.10); collectives take int32 only.
    with pytest.raises(TypeError, match="int32"):
        Cluster(0, 2, all_gather=None)._raw_gather(np.zeros(2, np.int64))


def test_share_by_bytes_contiguous_and_balanced():
    owners = share_by_bytes([0, 10, 20, 30, 40, 90], 100, 3)

    assert owners == sorted(owners)
    assert owners == [0, 0, 0, 0, 1, 2]


def test_file_layout_safetensors_crc_rejected():
    with pytest.raises(ShardsmithError, match="CRC only into .ckpt"):
        file_layout([], "safetensors", crc_check=True)


def parameter_differences(actual: Dict[str, Any], expected: Dict[str, Any]) -> List[str]:
    """List how two name -> Parameter (or str) dicts differ: names, order, dtypes, shapes, bytes."""
    if list(actual) != list(expected):
        return [f"names differ: {list(actual)} != {list(expected)}"]
    problems = []
    for name, value in expected.items():
        got = actual[name]
        if isinstance(value, str):
            if got != value:
                problems.append(f"{name}: {got!r} != {value!r}")
            continue
        if str(got.dtype) != str(value.dtype) or tuple(got.shape) != tuple(value.shape):
            problems.append(f"{name}: {got.dtype}{tuple(got.shape)} != {value.dtype}{tuple(value.shape)}")
        elif got.asnumpy().tobytes() != value.asnumpy().tobytes():
            problems.append(f"{name}: bytes differ")
    return problems


# -- slow: real msrun jobs ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def msrun_command(workers: int, log_dir: Path, *args: Any) -> List[str]:
    return [
        str(BIN / "msrun"), f"--worker_num={workers}", f"--local_worker_num={workers}",
        f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True", *map(str, args),
    ]


def msrun_env() -> Dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "GLOG_v": "3"}


def logs(log_dir: Path) -> str:
    """The workers' and the scheduler's logs without MindSpore's INFO lines, for failure messages."""
    parts = []
    for log in sorted(log_dir.glob("*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines() if not line.startswith("[INFO]")]
        parts.append(f"--- {log.name}\n" + "\n".join(lines[-60:]))
    return "\n".join(parts)


def run_msrun(workers: int, log_dir: Path, *args: Any, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            msrun_command(workers, log_dir, *args), env=msrun_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"msrun did not finish within {timeout} s\n{logs(log_dir)}")


@pytest.mark.slow
def test_gather_command_equals_merge_on_4_workers(inputs, tmp_path):
    output = tmp_path / "gathered.ckpt"
    merged = tmp_path / "merged.ckpt"
    jobs.merge([inputs["set4"]], inputs["plan4"], merged)

    started = time.monotonic()
    result = run_msrun(4, tmp_path / "log", BIN / "shardsmith", "gather", inputs["set4"], "--plan", inputs["plan4"], "-o", output)
    elapsed = time.monotonic() - started

    assert result.returncode == 0, result.stdout + result.stderr + logs(tmp_path / "log")
    assert "Error" not in (tmp_path / "log" / "scheduler.log").read_text()
    assert_same_files(output, merged)
    assert_same_files(output, inputs["full"])
    assert_same_manifest(output, merged, "gather")
    print(f"4-worker gather took {elapsed:.1f} s")


@pytest.mark.slow
def test_gather_command_missing_rank_fails_everywhere(inputs, tmp_path):
    source = tmp_path / "set2"
    shutil.copytree(inputs["set2"], source)
    shutil.rmtree(source / "rank_1")
    output = tmp_path / "gathered.ckpt"

    result = run_msrun(2, tmp_path / "log", BIN / "shardsmith", "gather", source, "--plan", inputs["plan2"], "-o", output)

    text = result.stdout + result.stderr
    assert result.returncode == 1, text
    worker_logs = [(tmp_path / "log" / f"worker_{r}.log").read_text() for r in range(2)]
    for log in worker_logs:
        assert f"rank 1: {source}: rank_1 is not found" in log, logs(tmp_path / "log")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "set2"]


@pytest.mark.slow
def test_gather_command_worker_killed(tmp_path):
    """A worker that dies mid-gather fails the job: msrun kills the rest, and no output appears."""
    full = save_model(tmp_path / "full.ckpt", model_tensors(large_rows=256 * 1024))  # a 64 MiB first parameter
    plan = write_plan(tmp_path / "plan2.toml", PLAN_2)
    jobs.split(full, plan, tmp_path / "set2")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "gathered.ckpt"
    log_dir = tmp_path / "log"
    psutil = pytest.importorskip("psutil")

    process = subprocess.Popen(
        msrun_command(2, log_dir, BIN / "shardsmith", "gather", tmp_path / "set2", "--plan", plan, "-o", output),
        env=msrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        killed = None
        deadline = time.monotonic() + 150
        while killed is None and time.monotonic() < deadline and process.poll() is None:
            if any(out_dir.iterdir()):  # rank 0 has started writing its temporary file
                for child in psutil.Process(process.pid).children(recursive=True):
                    with_env = child.environ() if child.is_running() else {}
                    if with_env.get("MS_ROLE") == "MS_WORKER" and with_env.get("RANK_ID") == "1":
                        child.send_signal(signal.SIGKILL)
                        killed = child.pid
                        break
            time.sleep(0.01)
        output_text, _ = process.communicate(timeout=150)
    finally:
        if process.poll() is None:
            process.kill()

    assert killed is not None, f"the gather ended before worker 1 could be killed\n{logs(log_dir)}"
    assert process.returncode == 1, output_text
    assert f"Worker process {killed} exit with exception. Error code: -9" in output_text
    assert not output.exists()
    # msrun SIGKILLs rank 0 too, so its temporary file stays; the next job writing there removes it.
    jobs.merge([tmp_path / "set2"], plan, output)
    assert sorted(p.name for p in out_dir.iterdir()) == ["gathered.ckpt", "gathered.ckpt.manifest.json"]


@pytest.mark.slow
def test_online_cases_on_2_workers(inputs, tmp_path):
    """Run `run_cases` under msrun on 2 workers; each case's outcome is checked on every rank."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "inputs.json").write_text(json.dumps({k: str(v) for k, v in inputs.items()}))

    result = run_msrun(2, tmp_path / "log", THIS, work, timeout=240)

    assert result.returncode == 0, result.stdout + result.stderr + logs(tmp_path / "log")
    outcomes = [json.loads((work / f"results_rank_{r}.json").read_text()) for r in range(2)]
    for rank, outcome in enumerate(outcomes):
        for case, expected in EXPECTED_OUTCOMES.items():
            got = outcome[case]
            assert (got["ok"], got.get("type")) == expected[:2], f"rank {rank}, {case}: {got}"
            if len(expected) > 2:
                assert expected[2] in got["error"], f"rank {rank}, {case}: {got['error']}"
            if got["ok"]:
                assert got["value"] in (None, []), f"rank {rank}, {case}: {got['value']}"
    # The failures are agreed, so both ranks report the same message.
    for case in ("missing_rank", "bad_slice", "replicas_differ", "small_replica_differs"):
        assert outcomes[0][case]["error"] == outcomes[1][case]["error"]

    assert_same_files(work / "gathered.ckpt", inputs["merged2"])
    assert_same_manifest(work / "gathered.ckpt", inputs["merged2"], "gather")
    assert_same_files(work / "gathered.safetensors", inputs["merged2_st"])
    assert_same_files(work / "params.ckpt", inputs["merged2"])
    for name in ("missing.ckpt", "bad_slice.ckpt", "replicas_differ.ckpt", "small_replica_differs.ckpt"):
        assert not (work / name).exists()
    first = tmp_path / "first.ckpt"
    jobs.merge([work / "broken_replicas_differ"], inputs["plan2"], first, replicas="first")
    assert_same_files(work / "replicas_first.ckpt", first)
    assert "keeping the lowest rank's copy" in (tmp_path / "log" / "worker_0.log").read_text()
    assert_same_files(work / "split", inputs["set2"])
    assert_same_files(work / "resharded", inputs["resharded"])
    assert_same_files(work / "merged.ckpt", inputs["merged2"])
    assert_same_manifest(work / "merged.ckpt", inputs["merged2"], "merge")
    assert_same_files(work / "merged_crc.ckpt", inputs["merged2_crc"])
    assert_same_files(work / "merged.safetensors", inputs["merged2_st"])


@pytest.mark.slow
def test_gather_example_runs(tmp_path):
    script = THIS.parents[1] / "examples" / "gather" / "run.sh"

    try:
        result = subprocess.run(
            ["bash", str(script), str(tmp_path)], env=msrun_env(), capture_output=True, text=True, timeout=240
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} did not finish within 240 s\n{logs(tmp_path / 'log_gather')}{logs(tmp_path / 'log_memory')}")

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{tmp_path}/gathered.ckpt and {tmp_path}/full.ckpt are identical" in result.stdout
    assert f"{tmp_path}/from_memory.ckpt and {tmp_path}/full.ckpt are identical" in result.stdout


# case -> (succeeds, exception type, text in the message)
EXPECTED_OUTCOMES = {
    "gather_files": (True, None),
    "gather_safetensors": (True, None),
    "gather_params_to_file": (True, None),
    "gather_params_in_memory": (True, None),
    "load_from_full": (True, None),
    "load_from_rank_set": (True, None),
    "missing_rank": (False, "DistributedError", "rank 1: "),
    "bad_slice": (False, "LayoutError", "rank 0 holds [16, 4] and rank 1 holds [16, 3]"),
    "replicas_differ": (False, "ValidationError", "copies that should be identical differ: the copy on rank 1 differs"),
    "small_replica_differs": (False, "DistributedError", "rank 0: parameter 'norm.gamma': no plan rule matches it, so it is taken as replicated, but copies"),
    "replicas_first": (True, None),
    "distributed_split": (True, None),
    "distributed_reshard": (True, None),
    "distributed_merge": (True, None),
    "distributed_merge_crc": (True, None),
    "distributed_merge_safetensors": (True, None),
}


# Rank sets made from the 2-rank set by changing one parameter on rank 1: a wrong slice shape, a
# large replicated tensor (compared by hash), a small one (gathered, compared on rank 0).
BROKEN = {"bad_slice": "embedding.weight", "replicas_differ": "big.table", "small_replica_differs": "norm.gamma"}


def _broken_copies(inputs: Dict[str, Path], work: Path) -> Dict[str, Path]:
    """Rank sets with one fault on rank 1, written by rank 0 before the cases that read them."""
    import mindspore

    broken = {}
    missing = work / "broken_missing"
    shutil.copytree(inputs["set2"], missing)
    shutil.rmtree(missing / "rank_1")
    broken["missing"] = missing

    for case, changed in BROKEN.items():
        root = work / f"broken_{case}"
        shutil.copytree(inputs["set2"], root)
        path = rank_file(root, 1)
        tensors: Dict[str, Any] = dict(mindspore.load_checkpoint(str(path)))
        values = tensors[changed].asnumpy().copy()
        if case == "bad_slice":
            tensors[changed] = mindspore.Tensor(values[:, :3])
        else:
            values.reshape(-1)[0] += 1
            tensors[changed] = mindspore.Tensor(values)
        tensors["epoch_num"] = int(tensors["epoch_num"].asnumpy())
        tensors["note"] = tensors.pop("note")
        path.unlink()
        save_model(path, tensors)
        broken[case] = root
    return broken


def run_cases(work: Path) -> None:
    """Run every case of EXPECTED_OUTCOMES on this msrun worker; write WORK/results_rank_<r>.json."""
    import mindspore
    from mindspore.communication import init, release

    if os.environ.get("MS_ROLE") == "MS_SCHED":
        init()
        return
    mindspore.set_device("CPU")
    init()

    from shardsmith.online import gather_params, load_rank_slice

    cluster = Cluster.from_mindspore()
    inputs = {k: Path(v) for k, v in json.loads((work / "inputs.json").read_text()).items()}
    failure = None
    if cluster.is_root:
        try:
            _broken_copies(inputs, work)
        except Exception as exc:  # noqa: BLE001 - rank 1 must not wait for rank 0 forever
            failure = repr(exc)
    cluster.check(failure)
    broken = {k: work / f"broken_{k}" for k in ("missing", *BROKEN)}
    own_file = rank_file(inputs["set2"], cluster.rank)
    small_chunks = 4096  # large.weight's 64 KiB slices cross 16 AllGathers

    def expect_same(actual: Dict[str, Any], path: Path) -> List[str]:
        return parameter_differences(actual, mindspore.load_checkpoint(str(path)))

    def gather_in_memory() -> List[str]:
        params = mindspore.load_checkpoint(str(own_file))
        full = gather_params(params, inputs["plan2"], chunk_bytes=small_chunks)
        if not cluster.is_root:
            return [] if full is None else ["a rank other than 0 got a result"]
        return expect_same(full, inputs["full"])

    cases: Dict[str, Callable[[], Any]] = {
        "gather_files": lambda: gather_files(
            cluster, [inputs["set2"]], inputs["plan2"], work / "gathered.ckpt", chunk_bytes=small_chunks
        ),
        "gather_safetensors": lambda: gather_files(
            cluster, [inputs["set2"]], inputs["plan2"], work / "gathered.safetensors",
            selection=Selection(exclude=("note",)),
        ),
        "gather_params_to_file": lambda: gather_params(
            mindspore.load_checkpoint(str(own_file)), inputs["plan2"], work / "params.ckpt", chunk_bytes=small_chunks
        ),
        "gather_params_in_memory": gather_in_memory,
        "load_from_full": lambda: expect_same(load_rank_slice(inputs["full"], inputs["plan2"]), own_file),
        "load_from_rank_set": lambda: expect_same(
            load_rank_slice(inputs["set4"], inputs["plan2"], source_plan=inputs["plan4"]), own_file
        ),
        "missing_rank": lambda: gather_files(cluster, [broken["missing"]], inputs["plan2"], work / "missing.ckpt"),
        "bad_slice": lambda: gather_files(cluster, [broken["bad_slice"]], inputs["plan2"], work / "bad_slice.ckpt"),
        "replicas_differ": lambda: gather_files(
            cluster, [broken["replicas_differ"]], inputs["plan2"], work / "replicas_differ.ckpt"
        ),
        "small_replica_differs": lambda: gather_files(
            cluster, [broken["small_replica_differs"]], inputs["plan2"], work / "small_replica_differs.ckpt"
        ),
        "replicas_first": lambda: gather_files(
            cluster, [broken["replicas_differ"]], inputs["plan2"], work / "replicas_first.ckpt", replicas="first"
        ),
        "distributed_split": lambda: distribute(cluster, "split", [inputs["full"]], inputs["plan2"], work / "split"),
        "distributed_reshard": lambda: distribute(
            cluster, "reshard", [inputs["set4"]], inputs["plan4"], work / "resharded", to_plan=inputs["plan2"]
        ),
        "distributed_merge": lambda: distribute(cluster, "merge", [inputs["set2"]], inputs["plan2"], work / "merged.ckpt"),
        "distributed_merge_crc": lambda: distribute(
            cluster, "merge", [inputs["set2"]], inputs["plan2"], work / "merged_crc.ckpt", crc_check=True
        ),
        "distributed_merge_safetensors": lambda: distribute(
            cluster, "merge", [inputs["set2"]], inputs["plan2"], work / "merged.safetensors",
            selection=Selection(exclude=("note",)),
        ),
    }
    results = {}
    for name, case in cases.items():
        try:
            value = case()
            # Comparing cases return a list of differences; the others return a Job or None.
            results[name] = {"ok": True, "value": value if isinstance(value, list) else None}
        except ShardsmithError as exc:
            results[name] = {"ok": False, "type": type(exc).__name__, "error": exc.format()}
    (work / f"results_rank_{cluster.rank}.json").write_text(json.dumps(results, indent=1))
    release()


if __name__ == "__main__":
    run_cases(Path(sys.argv[1]))
