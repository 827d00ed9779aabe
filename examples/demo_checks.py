"""The checks of examples/demo.sh, run on one device after shardsmith has moved the checkpoint.

    python demo_checks.py merged MERGED.ckpt --reference reference.json --export model.mindir
    python demo_checks.py resumed --reference reference.json --record resumed.json

`merged` loads a weights-only checkpoint into the single-device network and compares its output
with the 4-rank model's at the checkpoint, then exports the network as MINDIR and runs the export.
`resumed` compares the losses of a run resumed from a resharded checkpoint with the losses the
original run had at the same steps. Each exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "hybrid_parallel"))

# Different ranks sum partial products in a different order than one device does, so results
# agree to float32 rounding, not bit for bit.
RTOL = 1e-5
ATOL = 1e-6


def report(ok: bool, check: str) -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'} {check}")
    return ok


def max_difference(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - np.asarray(expected)).max())


def check_merged(args: argparse.Namespace) -> bool:
    import mindspore as ms
    from mindspore import Tensor, nn

    from model import FullNet, initial_weights, probe_input

    ms.set_device("CPU")
    reference = json.loads(args.reference.read_text())
    expected = np.asarray(reference["probe_output"], dtype=np.float32)

    params = ms.load_checkpoint(str(args.merged))
    # The initial weights are overwritten by the merged ones; strict loading fails on any missing
    # or misshaped parameter rather than keeping the initial value.
    net = FullNet(initial_weights())
    net_names = [p.name for p in net.get_parameters()]
    not_loaded, unused = ms.load_param_into_net(net, params, strict_load=True)
    ok = report(not not_loaded, f"every parameter of the single-device network is in {args.merged.name}")
    ok &= report(not unused, f"{args.merged.name} holds only network weights: {len(params)} parameters, no optimizer state")
    ok &= report(list(params) == net_names, "its parameters keep the network's order")

    output = net(Tensor(probe_input())).asnumpy()
    difference = max_difference(output, expected)
    ok &= report(
        np.allclose(output, expected, rtol=RTOL, atol=ATOL),
        f"its output on the probe input equals the 4-rank model's (max difference {difference:.2e})",
    )

    stem = str(args.export.with_suffix(""))
    ms.export(net, Tensor(probe_input()), file_name=stem, file_format="MINDIR")
    exported = nn.GraphCell(ms.load(stem + ".mindir"))
    exported_output = exported(Tensor(probe_input())).asnumpy()
    difference = max_difference(exported_output, expected)
    ok &= report(
        np.allclose(exported_output, expected, rtol=RTOL, atol=ATOL),
        f"exported {stem}.mindir, and the exported graph gives the same output (max difference {difference:.2e})",
    )
    return ok


def check_resumed(args: argparse.Namespace) -> bool:
    reference = json.loads(args.reference.read_text())
    record = json.loads(args.record.read_text())
    before = reference["world_size"]
    after = record["world_size"]

    ok = report(
        record["start_step"] == reference["checkpoint_step"],
        f"the {after}-rank run resumed at step {record['start_step']}, where the {before}-rank run saved",
    )
    difference = max_difference(record["probe_output"], reference["probe_output"])
    ok &= report(
        np.allclose(record["probe_output"], reference["probe_output"], rtol=RTOL, atol=ATOL),
        f"its output on the probe input equals the {before}-rank model's (max difference {difference:.2e})",
    )
    expected = reference["losses_after_checkpoint"]
    losses = record["losses"]
    if len(losses) != len(expected):
        return report(False, f"the resumed run recorded {len(losses)} losses, the reference has {len(expected)}")
    for offset, (loss, want) in enumerate(zip(losses, expected)):
        step = record["start_step"] + offset
        ok &= report(
            np.isclose(loss, want, rtol=RTOL, atol=0),
            f"loss at step {step}: {loss:.7f} with {after} ranks, {want:.7f} with {before} ranks",
        )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    merged = commands.add_parser("merged", help="check a merged weights-only checkpoint and export it")
    merged.add_argument("merged", type=Path, help="the merged checkpoint")
    merged.add_argument("--reference", type=Path, required=True, help="reference.json of the training run")
    merged.add_argument("--export", type=Path, required=True, help="path of the MINDIR file to write")

    resumed = commands.add_parser("resumed", help="compare a resumed run's losses with the original run's")
    resumed.add_argument("--reference", type=Path, required=True, help="reference.json of the original run")
    resumed.add_argument("--record", type=Path, required=True, help="the JSON record of the resumed run")

    args = parser.parse_args()
    ok = check_merged(args) if args.command == "merged" else check_resumed(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
