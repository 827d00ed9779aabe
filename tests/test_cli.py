"""The command line on real MindSpore checkpoints: merge, split, reshard, inspect, strategies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import load_ms, row_blocks, save_ms, write_plan, write_rank_set

pytestmark = pytest.mark.usefixtures("builtin_only")

ROW4 = 'world_size = 4\n[[param]]\nmatch = "w"\nstrategy = "row"\n'


def tiles(array: np.ndarray, a: int, b: int):
    """Rank r's tile of a grid [a, b]: (i, j) with r = i*b + j."""
    rows, cols = array.shape[0] // a, array.shape[1] // b
    return [array[(r // b) * rows : (r // b + 1) * rows, (r % b) * cols : (r % b + 1) * cols] for r in range(a * b)]


@pytest.fixture()
def model(tmp_path: Path, ms):
    """A 4-rank set: w row-split with its Momentum state, g on a 2x2 grid, norm replicated, scalars."""
    rng = np.random.default_rng(0)
    full = {
        "w": rng.standard_normal((8, 4)).astype(np.float32),
        "g": rng.standard_normal((4, 6)).astype(np.float32),
        "norm.weight": rng.standard_normal(4).astype(np.float32),
        "moments.w": rng.standard_normal((8, 4)).astype(np.float32),
        "learning_rate": np.array(0.01, np.float32),
        "global_step": np.array([7], np.int32),
    }
    w = row_blocks(full["w"], 4, 4)
    mw = row_blocks(full["moments.w"], 4, 4)
    g = tiles(full["g"], 2, 2)
    per_rank = [
        {"w": w[r], "g": g[r], "norm.weight": full["norm.weight"], "moments.w": mw[r],
         "learning_rate": full["learning_rate"], "global_step": full["global_step"]}
        for r in range(4)
    ]
    rank_set = write_rank_set(tmp_path / "set", per_rank)
    full_path = save_ms(tmp_path / "full.ckpt", full)
    plan = write_plan(tmp_path / "plan.toml", ROW4 + '[[param]]\nmatch = "g"\nstrategy = "grid"\ngrid = [2, 2]\n')
    return {"full": full, "set": rank_set, "full_path": full_path, "plan": plan, "tmp": tmp_path}


def test_merge_is_byte_identical_to_mindspore_save(cli, model):
    out = model["tmp"] / "merged.ckpt"
    result = cli("merge", model["set"], "--plan", model["plan"], "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == model["full_path"].read_bytes()
    loaded = load_ms(out)
    assert list(loaded) == list(model["full"])
    for name, array in model["full"].items():
        np.testing.assert_array_equal(loaded[name], array)


def test_split_reproduces_rank_files(cli, model):
    out = model["tmp"] / "split"
    result = cli("split", model["full_path"], "--plan", model["plan"], "-o", out)
    assert result.exit_code == 0, result.output
    for rank in range(4):
        written = out / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
        assert written.read_bytes() == (model["set"] / f"rank_{rank}" / "net.ckpt").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rank_0", "rank_1", "rank_2", "rank_3"]
    assert [p.name for p in (out / "rank_0").iterdir()] == ["checkpoint_0.ckpt"]


def test_split_prefix_and_safetensors_format(cli, model, ms):
    out = model["tmp"] / "split"
    result = cli("split", model["full_path"], "--plan", model["plan"], "-o", out, "--prefix", "net_rank", "--format", "safetensors")
    assert result.exit_code == 0, result.output
    path = out / "rank_3" / "net_rank3.safetensors"
    loaded = ms.load_checkpoint(str(path), format="safetensors")
    np.testing.assert_array_equal(loaded["w"].asnumpy(), model["full"]["w"][6:8])


def test_reshard_four_to_two_equals_split_of_full(cli, model):
    plan2 = write_plan(model["tmp"] / "plan2.toml", 'world_size = 2\n[[param]]\nmatch = "[wg]"\nstrategy = "column"\n')
    direct = model["tmp"] / "direct"
    via_full = model["tmp"] / "via_full"
    assert cli("reshard", model["set"], "--plan", model["plan"], "--to-plan", plan2, "-o", direct).exit_code == 0
    assert cli("split", model["full_path"], "--plan", plan2, "-o", via_full).exit_code == 0
    for rank in range(2):
        name = f"rank_{rank}/checkpoint_{rank}.ckpt"
        assert (direct / name).read_bytes() == (via_full / name).read_bytes()


def test_merge_weights_only_drops_optimizer_state(cli, model):
    out = model["tmp"] / "weights.ckpt"
    result = cli("merge", model["set"], "--plan", model["plan"], "-o", out, "--weights-only")
    assert result.exit_code == 0, result.output
    assert list(load_ms(out)) == ["w", "g", "norm.weight"]


def test_merge_include_exclude(cli, model):
    out = model["tmp"] / "some.ckpt"
    result = cli("merge", model["set"], "--plan", model["plan"], "-o", out, "--include", "*w*", "--exclude", "moments.*")
    assert result.exit_code == 0, result.output
    assert list(load_ms(out)) == ["w", "norm.weight"]


def test_existing_output_needs_force(cli, model):
    out = model["tmp"] / "merged.ckpt"
    out.write_bytes(b"keep me")
    result = cli("merge", model["set"], "--plan", model["plan"], "-o", out)
    assert result.exit_code == 1
    assert "output exists" in result.stderr
    assert out.read_bytes() == b"keep me"
    assert cli("merge", model["set"], "--plan", model["plan"], "-o", out, "--force").exit_code == 0
    assert out.read_bytes() == model["full_path"].read_bytes()


def test_dry_run_writes_nothing(cli, model):
    out = model["tmp"] / "merged.ckpt"
    result = cli("merge", model["set"], "--plan", model["plan"], "-o", out, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    assert report["parameters"] == 6
    assert not out.exists()
    assert sorted(p.name for p in model["tmp"].iterdir()) == ["full.ckpt", "plan.toml", "set"]


def test_bad_plan_fails_with_one_message_and_no_output(cli, model):
    bad = write_plan(model["tmp"] / "bad.toml", 'world_size = 4\n[[param]]\nmatch = "w"\nstrategy = "rows"\n')
    out = model["tmp"] / "merged.ckpt"
    result = cli("merge", model["set"], "--plan", bad, "-o", out)
    assert result.exit_code == 1
    assert "bad.toml: rule 1 (match = 'w'): unknown strategy 'rows'" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_several_checkpoints_per_rank_need_select(cli, model, tmp_path):
    for rank in range(4):
        src = model["set"] / f"rank_{rank}" / "net.ckpt"
        (src.parent / "net-10_32.ckpt").write_bytes(src.read_bytes())
        src.rename(src.parent / "net-9_32.ckpt")
    out = tmp_path / "merged.ckpt"
    result = cli("merge", model["set"], "--plan", model["plan"], "-o", out)
    assert result.exit_code == 1
    assert "rank 0: 2 checkpoints (net-9_32.ckpt, net-10_32.ckpt)" in result.stderr
    assert "--select 'net-10_*.ckpt'" in result.stderr
    assert "--select" in result.stderr
    result = cli("merge", model["set"], "--plan", model["plan"], "-o", out, "--select", "net-10_*.ckpt")
    assert result.exit_code == 0, result.output


def test_rank_files_given_in_order(cli, model):
    files = [model["set"] / f"rank_{r}" / "net.ckpt" for r in range(4)]
    out = model["tmp"] / "merged.ckpt"
    assert cli("merge", *files, "--plan", model["plan"], "-o", out).exit_code == 0
    assert out.read_bytes() == model["full_path"].read_bytes()


def test_inspect_json_of_rank_set(cli, model):
    result = cli("inspect", model["set"], "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["world_size"] == 4
    by_name = {p["name"]: p for p in data["params"]}
    assert list(by_name) == list(model["full"])
    assert by_name["w"]["dtype"] == "Float32"
    assert by_name["w"]["rank_shapes"] == [[2, 4]] * 4
    assert by_name["learning_rate"]["rank_shapes"] == [[]] * 4


def test_inspect_json_of_checkpoint(cli, model):
    result = cli("inspect", model["full_path"], "--json")
    assert result.exit_code == 0, result.output
    params = json.loads(result.stdout)["params"]
    assert [(p["name"], p["dtype"], p["shape"]) for p in params][:2] == [("w", "Float32", [8, 4]), ("g", "Float32", [4, 6])]


def test_inspect_table(cli, model):
    result = cli("inspect", model["full_path"])
    assert result.exit_code == 0, result.output
    assert "moments.w" in result.stdout
    assert "[8, 4]" in result.stdout


def test_strategies_lists_builtins_with_source(cli):
    result = cli("strategies", "--json")
    assert result.exit_code == 0, result.output
    rows = {s["name"]: s for s in json.loads(result.stdout)["strategies"]}
    assert list(rows) == ["replicate", "row", "column", "grid", "tensor_map", "mirror"]
    assert rows["grid"]["source"] == "shardsmith (built-in)"
    assert rows["row"]["options"][0]["name"] == "parts"


def test_verify_reports_difference(cli, model, tmp_path):
    other = dict(model["full"])
    other["w"] = other["w"].copy()
    other["w"][1, 2] += 1
    changed = save_ms(tmp_path / "changed.ckpt", other)
    result = cli("verify", model["full_path"], changed)
    assert result.exit_code == 1
    assert "w: bytes differ (1 of 32 elements, the first at index [1, 2])" in result.stdout
    assert cli("verify", model["full_path"], model["full_path"]).exit_code == 0


ALL_DTYPES = ["Float16", "Float32", "Float64", "BFloat16", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Bool"]


def test_every_dtype_survives_merge_and_split(cli, ms, tmp_path):
    from shardsmith.formats import open_checkpoint

    rng = np.random.default_rng(1)
    full = {}
    for dtype in ALL_DTYPES:
        if dtype == "Bool":
            full[dtype.lower()] = rng.integers(0, 2, (4, 4)).astype(bool)
        elif dtype == "BFloat16":
            full[dtype.lower()] = (rng.standard_normal((4, 4)).astype(np.float32), "BFloat16")
        else:
            np_type = {"Float16": np.float16, "Float32": np.float32, "Float64": np.float64}.get(dtype, getattr(np, dtype.lower(), None))
            full[dtype.lower()] = (rng.integers(0, 100, (4, 4)) if "Int" in dtype else rng.standard_normal((4, 4))).astype(np_type)
    full_path = save_ms(tmp_path / "full.ckpt", full)
    plan = write_plan(tmp_path / "plan.toml", 'world_size = 2\n[[param]]\nmatch = "*"\nstrategy = "row"\n')
    assert cli("split", full_path, "--plan", plan, "-o", tmp_path / "set").exit_code == 0
    result = cli("merge", tmp_path / "set", "--plan", plan, "-o", tmp_path / "merged.ckpt")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged.ckpt").read_bytes() == full_path.read_bytes()
    with open_checkpoint(tmp_path / "set" / "rank_1" / "checkpoint_1.ckpt") as reader:
        assert [i.dtype for i in reader] == ALL_DTYPES
        assert reader.info("bfloat16").shape == (2, 4)


def test_multi_record_parameter_merges(cli, ms, tmp_path, monkeypatch):
    """A tensor stored as several records (MindSpore's > 512 MiB pieces, made small here) merges and splits."""
    import mindspore.train.serialization as serialization

    from shardsmith.formats import ckpt

    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KiB: pieces of 1 KiB
    monkeypatch.setattr(ckpt, "PIECE_SIZE", 1024)
    full = {"w": np.arange(2000, dtype=np.float32).reshape(40, 50)}
    full_path = save_ms(tmp_path / "full.ckpt", full)
    plan = write_plan(tmp_path / "plan.toml", 'world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "column"\n')
    assert cli("split", full_path, "--plan", plan, "-o", tmp_path / "set").exit_code == 0
    assert cli("merge", tmp_path / "set", "--plan", plan, "-o", tmp_path / "merged.ckpt").exit_code == 0
    np.testing.assert_array_equal(load_ms(tmp_path / "merged.ckpt")["w"], full["w"])


def test_crc_trailer_written_and_read(cli, model, ms):
    out = model["tmp"] / "merged.ckpt"
    assert cli("merge", model["set"], "--plan", model["plan"], "-o", out, "--crc").exit_code == 0
    assert out.read_bytes()[-17:-10] == b"crc_num"
    loaded = ms.load_checkpoint(str(out), crc_check=True)
    np.testing.assert_array_equal(loaded["w"].asnumpy(), model["full"]["w"])


def test_rank_files_from_shell_glob_are_put_in_rank_order(cli, ms, tmp_path):
    full = np.arange(12 * 2, dtype=np.float32).reshape(12, 2)
    write_rank_set(tmp_path / "set", [{"w": block} for block in row_blocks(full, 12, 12)])
    plan = write_plan(tmp_path / "plan.toml", 'world_size = 12\n[[param]]\nmatch = "w"\nstrategy = "row"\n')
    as_globbed = sorted((tmp_path / "set").glob("rank_*/net.ckpt"))  # rank_0, rank_1, rank_10, rank_11, rank_2, ...
    assert as_globbed[2].parent.name == "rank_10"
    result = cli("merge", *as_globbed, "--plan", plan, "-o", tmp_path / "merged.ckpt")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(load_ms(tmp_path / "merged.ckpt")["w"], full)


def test_rank_files_naming_a_rank_twice_are_rejected(cli, model):
    rank0 = model["set"] / "rank_0" / "net.ckpt"
    files = [rank0, rank0, model["set"] / "rank_2" / "net.ckpt", model["set"] / "rank_3" / "net.ckpt"]
    result = cli("merge", *files, "--plan", model["plan"], "-o", model["tmp"] / "merged.ckpt")
    assert result.exit_code == 1
    assert "is given twice" in result.stderr


def test_force_never_replaces_a_directory_with_other_files(cli, model):
    out = model["tmp"] / "models"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = cli("split", model["full_path"], "--plan", model["plan"], "-o", out, "--force")
    assert result.exit_code == 1
    assert "output directory holds files its shardsmith manifest does not list (notes.txt)" in result.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert cli("split", model["full_path"], "--plan", model["plan"], "-o", model["tmp"] / "split").exit_code == 0
    result = cli("split", model["full_path"], "--plan", model["plan"], "-o", model["tmp"] / "split", "--force")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("option, value", [("--rtol", "-1"), ("--atol", "nan"), ("--atol", "inf")])
def test_verify_rejects_bad_tolerance(cli, model, option, value):
    result = cli("verify", model["full_path"], model["full_path"], option, value)
    assert result.exit_code == 2
    assert f"{option} must be a finite number of at least 0, got {float(value)}" in result.stderr


def test_merge_reads_encrypted_rank_set_with_key_file(cli, ms, tmp_path):
    key = b"0123456789abcdef"
    (tmp_path / "key.bin").write_bytes(key)
    full = np.arange(32, dtype=np.float32).reshape(8, 4)
    for rank, block in enumerate(row_blocks(full, 2, 2)):
        save_ms(tmp_path / "set" / f"rank_{rank}" / "net.ckpt", {"w": block}, enc_key=key, enc_mode="AES-GCM")
    plan = write_plan(tmp_path / "plan.toml", 'world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "row"\n')
    out = tmp_path / "merged.ckpt"
    result = cli("merge", tmp_path / "set", "--plan", plan, "-o", out)
    assert result.exit_code == 1
    assert "the file is encrypted (AES-GCM). Pass --key-file" in result.stderr
    result = cli("merge", tmp_path / "set", "--plan", plan, "-o", out, "--key-file", tmp_path / "key.bin")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(load_ms(out)["w"], full)


@pytest.mark.parametrize("selection", [["--include", "moments.*"], ["--exclude", "w"]])
def test_reshard_of_selected_state_keeps_its_parameters_layout(cli, model, selection):
    out = model["tmp"] / "out"
    result = cli("reshard", model["set"], "--plan", model["plan"], "--to-plan", model["plan"], "-o", out, *selection)
    assert result.exit_code == 0, result.output
    for rank in range(4):
        written = out / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
        np.testing.assert_array_equal(load_ms(written)["moments.w"], model["full"]["moments.w"][2 * rank : 2 * rank + 2])


def test_force_keeps_other_files_inside_rank_directories(cli, model):
    out = model["tmp"] / "split"
    assert cli("split", model["full_path"], "--plan", model["plan"], "-o", out).exit_code == 0
    (out / "rank_0" / "train.log").write_text("mine")
    result = cli("split", model["full_path"], "--plan", model["plan"], "-o", out, "--force")
    assert result.exit_code == 1
    assert "(rank_0/train.log)" in result.stderr
    assert (out / "rank_0" / "train.log").read_text() == "mine"


def test_force_never_replaces_the_plan(cli, model):
    result = cli("merge", model["set"], "--plan", model["plan"], "-o", model["plan"], "--force", "--format", "ckpt")
    assert result.exit_code == 1
    assert "the output is the input" in result.stderr
    assert "world_size = 4" in model["plan"].read_text()


def test_existing_manifest_needs_force(cli, model):
    out = model["tmp"] / "merged.ckpt"
    (model["tmp"] / "merged.ckpt.manifest.json").write_text("notes")
    result = cli("merge", model["set"], "--plan", model["plan"], "-o", out)
    assert result.exit_code == 1
    assert "merged.ckpt.manifest.json, exists" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("prefix", ["../../evil_", "sub/x_", ".hidden"])
def test_prefix_must_stay_inside_rank_directory(cli, model, prefix):
    out = model["tmp"] / "split"
    result = cli("split", model["full_path"], "--plan", model["plan"], "-o", out, "--prefix", prefix)
    assert result.exit_code == 1
    assert "must be a plain file-name prefix" in result.stderr
    assert sorted(p.name for p in model["tmp"].iterdir()) == ["full.ckpt", "plan.toml", "set"]


def test_crc_with_safetensors_is_refused_before_writing(cli, model):
    for extra in ([], ["--dry-run"]):
        result = cli("merge", model["set"], "--plan", model["plan"], "-o", model["tmp"] / "m.safetensors", "--crc", *extra)
        assert result.exit_code == 1
        assert "--crc is available for .ckpt output only" in result.stderr


def test_uneven_split_names_the_plan_file(cli, model, tmp_path):
    plan = write_plan(tmp_path / "three.toml", 'world_size = 3\n[[param]]\nmatch = "w"\nstrategy = "row"\n')
    result = cli("split", model["full_path"], "--plan", plan, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert f"{plan}: parameter 'w': dim 0 of size 8 does not divide into 3 parts" in result.stderr
