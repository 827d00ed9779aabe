"""examples/demo.sh end to end, then its outputs checked again against the example's own layout.

The demo trains examples/hybrid_parallel on 4 msrun CPU workers, merges and reshards the rank set
with shardsmith and resumes on 2 workers, checking outputs and losses as it goes. These tests run
it once into a temporary directory and check its files bit for bit against the slicing written
by hand in examples/hybrid_parallel/model.py, which does not use shardsmith. The last tests
check, without msrun, that the demo's checks fail on a wrong loss or a wrongly merged weight.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import load_ms, save_ms

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hybrid_parallel"
ADAM_PREFIXES = ("moment1.", "moment2.")


def _example_model():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import model
    finally:
        sys.path.remove(str(EXAMPLE))
    return model


def _venv_env() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "GLOG_v": "3"}


def _parameter_of(name: str) -> str:
    for prefix in ADAM_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _rank_file(rank_set: Path, rank: int) -> Path:
    (path,) = (rank_set / f"rank_{rank}").glob("*.ckpt")
    return path


def _assert_hand_sliced(full: dict, rank_set: Path, layout) -> None:
    """Check that every rank file of `rank_set` holds exactly model.slice_of of the full tensors."""
    model = _example_model()
    for rank in range(layout.world_size):
        saved = load_ms(_rank_file(rank_set, rank))
        assert list(saved) == list(full), f"rank {rank}: names or order differ"
        for name, value in saved.items():
            expected = model.slice_of(_parameter_of(name), full[name], layout, rank)
            assert value.dtype == expected.dtype, f"rank {rank}: {name}"
            assert value.shape == expected.shape, f"rank {rank}: {name}"
            assert value.tobytes() == expected.tobytes(), f"rank {rank}: {name}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run examples/demo.sh once; return its output directory and stdout."""
    out = tmp_path_factory.mktemp("demo") / "output"
    env = {**_venv_env(), "SHARDSMITH_DEMO_SKIP_SETUP": "1", "MSRUN_TIMEOUT": "300"}
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "demo.sh"), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"demo.sh failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return out, result.stdout


@pytest.fixture(scope="module")
def full_with_state(demo, tmp_path_factory):
    """The 4-rank set merged with its optimizer state and scalars, as numpy arrays."""
    out, _ = demo
    path = tmp_path_factory.mktemp("full") / "full.ckpt"
    subprocess.run(
        ["shardsmith", "merge", str(out / "run4"), "--plan", str(EXAMPLE / "plan_4.toml"), "-o", str(path)],
        env=_venv_env(),
        check=True,
        capture_output=True,
    )
    return load_ms(path)


@pytest.mark.slow
def test_demo_passes_every_check(demo):
    _, stdout = demo
    assert "FAIL" not in stdout
    assert stdout.count("  ok   ") == 9
    assert "All checks passed" in stdout


@pytest.mark.slow
def test_training_checked_gradients(demo):
    out, _ = demo
    for rank in range(4):
        log = (out / "logs" / "run4" / f"worker_{rank}.log").read_text()
        assert f"rank {rank}: step-0 loss and all 8 gradient slices match the single-device run" in log


@pytest.mark.slow
def test_rank_files_are_hand_slices(demo, full_with_state):
    out, _ = demo
    model = _example_model()
    _assert_hand_sliced(full_with_state, out / "run4", model.LAYOUTS[4])


@pytest.mark.slow
def test_weights_only_merge_is_exact(demo, full_with_state):
    out, _ = demo
    merged = load_ms(out / "merged.ckpt")
    assert list(merged) == ["ln.gamma", "ln.beta", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    for name, value in merged.items():
        assert value.tobytes() == full_with_state[name].tobytes(), name


@pytest.mark.slow
def test_merged_shapes_are_full(demo):
    out, _ = demo
    model = _example_model()
    merged = load_ms(out / "merged.ckpt")
    for name, value in model.initial_weights().items():
        assert merged[name].shape == value.shape, name


@pytest.mark.slow
def test_resharded_files_are_hand_slices(demo, full_with_state):
    out, _ = demo
    model = _example_model()
    _assert_hand_sliced(full_with_state, out / "set2", model.LAYOUTS[2])


@pytest.mark.slow
def test_scalars_survive_reshard(demo, full_with_state):
    out, _ = demo
    assert full_with_state["global_step"].tolist() == [5]
    assert full_with_state["step_num"].tolist() == 5
    for rank in range(2):
        saved = load_ms(_rank_file(out / "set2", rank))
        for name in ("global_step", "learning_rate", "beta1_power", "beta2_power", "step_num"):
            assert saved[name].tobytes() == full_with_state[name].tobytes(), f"rank {rank}: {name}"


@pytest.mark.slow
def test_resumed_losses_continue_run(demo):
    out, _ = demo
    reference = json.loads((out / "run4" / "reference.json").read_text())
    resumed = json.loads((out / "resumed.json").read_text())
    assert resumed["world_size"] == 2
    assert resumed["start_step"] == reference["checkpoint_step"] == 5
    np.testing.assert_allclose(resumed["losses"], reference["losses_after_checkpoint"], rtol=1e-5)
    np.testing.assert_allclose(resumed["probe_output"], reference["probe_output"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_mindir_exported(demo):
    out, _ = demo
    assert (out / "model.mindir").stat().st_size > 0


def _run_msrun(command: list, timeout: float) -> int:
    """Run msrun and return its exit code; on timeout stop it with SIGINT, which also stops its workers."""
    process = subprocess.Popen(command, env=_venv_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["full", "rank_set_of_4"])
def test_resume_loads_other_sources(demo, source, tmp_path):
    """Resume on 2 ranks with load_rank_slice reading a full checkpoint or the 4-rank set directly."""
    out, _ = demo
    if source == "full":
        full = tmp_path / "full.ckpt"
        subprocess.run(
            ["shardsmith", "merge", str(out / "run4"), "--plan", str(EXAMPLE / "plan_4.toml"), "-o", str(full)],
            env=_venv_env(),
            check=True,
            capture_output=True,
        )
        resume = ["--resume", str(full)]
    else:
        resume = ["--resume", str(out / "run4"), "--source-plan", str(EXAMPLE / "plan_4.toml")]
    record = tmp_path / "resumed.json"
    logs = tmp_path / "logs"
    command = [
        "msrun", "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", f"--log_dir={logs}", "--join=True",
        str(EXAMPLE / "train.py"), *resume, "--plan", str(EXAMPLE / "plan_2.toml"),
        "--steps", "2", "--record", str(record),
    ]  # fmt: skip

    returncode = _run_msrun(command, timeout=300)

    worker_logs = "\n".join(log.read_text()[-3000:] for log in sorted(logs.glob("*.log")))
    assert returncode == 0, worker_logs
    reference = json.loads((out / "run4" / "reference.json").read_text())
    resumed = json.loads(record.read_text())
    assert resumed["start_step"] == 5
    np.testing.assert_allclose(resumed["losses"], reference["losses_after_checkpoint"], rtol=1e-5)
    np.testing.assert_allclose(resumed["probe_output"], reference["probe_output"], rtol=1e-5, atol=1e-6)


def _run_checks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo_checks.py"), *args],
        env=_venv_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _write_reference(path: Path, probe_output) -> Path:
    reference = {
        "world_size": 4,
        "checkpoint_step": 5,
        "losses_before_checkpoint": [0.5, 0.45, 0.44, 0.4, 0.41],
        "losses_after_checkpoint": [0.39, 0.43],
        "probe_output": np.asarray(probe_output).tolist(),
    }
    path.write_text(json.dumps(reference))
    return path


def test_resumed_check_rejects_other_loss(tmp_path):
    reference = _write_reference(tmp_path / "reference.json", [[0.0, 1.0]])
    record = tmp_path / "resumed.json"
    record.write_text(json.dumps({"world_size": 2, "start_step": 5, "losses": [0.39, 0.4301], "probe_output": [[0.0, 1.0]]}))

    result = _run_checks("resumed", "--reference", str(reference), "--record", str(record))

    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL loss at step 6" in result.stdout
    assert "ok   loss at step 5" in result.stdout


@pytest.mark.slow
def test_merged_check_rejects_swapped_blocks(tmp_path, ms):
    model = _example_model()
    weights = model.initial_weights()
    probe_output = model.FullNet(weights)(ms.Tensor(model.probe_input())).asnumpy()
    reference = _write_reference(tmp_path / "reference.json", probe_output)
    good = save_ms(tmp_path / "good.ckpt", weights)
    # Row blocks 0 and 1 of fc3.weight swapped: what a merge with the wrong grid order writes.
    top, bottom = np.split(weights["fc3.weight"], 2, axis=0)
    swapped = save_ms(tmp_path / "swapped.ckpt", {**weights, "fc3.weight": np.concatenate([bottom, top])})

    accepted = _run_checks("merged", str(good), "--reference", str(reference), "--export", str(tmp_path / "good.mindir"))
    rejected = _run_checks("merged", str(swapped), "--reference", str(reference), "--export", str(tmp_path / "bad.mindir"))

    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert rejected.returncode == 1, rejected.stdout + rejected.stderr
    assert "FAIL its output on the probe input" in rejected.stdout
