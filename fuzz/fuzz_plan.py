"""Fuzz the plan loader and the layouts it resolves: any plan file must load and lay out a
small model cleanly, or raise a ShardsmithError.

    python fuzz/fuzz_plan.py /tmp/fuzz/plan fuzz/corpus/plan -max_total_time=600 -rss_limit_mb=1024 -dict=fuzz/plan.dict
"""

import sys

import atheris

with atheris.instrument_imports(include=["shardsmith"]):
    from shardsmith.errors import ShardsmithError
    from shardsmith.plan import load_plan, resolve_full, resolve_slices

from harness import scratch_path, write_input

PATH = scratch_path(".toml")

# A small model with the cases a plan meets: a 2-D weight and its optimizer states, a bias with
# Adam states, AdaFactor's factored states, a [1] buffer and a 0-d scalar.
SHAPES = {
    "w": (8, 4),
    "b": (4,),
    "moments.w": (8, 4),
    "adam_m.b": (4,),
    "exp_avg_sq_row_w": (8,),
    "exp_avg_sq_col_w": (4,),
    "exp_avg_sq_w": (1,),
    "global_step": (1,),
    "learning_rate": (),
}
DTYPES = {name: "Float32" for name in SHAPES}
NAMES = list(SHAPES)

# Laying out a plan costs time linear in its world size. Larger plans are only loaded here,
# because the world size check that runs before any layout has tests of its own.
MAX_RESOLVED_WORLD_SIZE = 4096


def test_one_input(data: bytes) -> None:
    write_input(PATH, data)
    try:
        plan = load_plan(PATH)
    except ShardsmithError:
        return
    if plan.world_size > MAX_RESOLVED_WORLD_SIZE:
        return
    try:
        layouts = resolve_full(plan, NAMES, DTYPES, SHAPES)
    except ShardsmithError:
        return
    slice_shapes = {name: list(layouts[name].layout.slice_shapes) for name in NAMES}
    # Merging what a split writes must find the same layouts from the slice shapes alone.
    # Strategies whose slice shapes do not determine the full shape may raise instead.
    try:
        back = resolve_slices(plan, NAMES, DTYPES, slice_shapes)
    except ShardsmithError:
        return
    for name in NAMES:
        if back[name].layout.full_shape != SHAPES[name]:
            raise AssertionError(
                f"{name}: split gives slices {slice_shapes[name]}, merge reads them as full shape "
                f"{back[name].layout.full_shape}, not {SHAPES[name]}"
            )


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
