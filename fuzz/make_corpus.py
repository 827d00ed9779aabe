"""Write the seed corpus of the fuzzers with MindSpore itself, so the fuzzers start from real files.

    python fuzz/make_corpus.py        # rewrites fuzz/corpus/{ckpt,safetensors,plan}/seed-*
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CORPUS = Path(__file__).resolve().parent / "corpus"

PLANS = {
    "row": 'world_size = 2\n\n[[param]]\nmatch = "w"\nstrategy = "row"\n',
    "grid": 'world_size = 4\n\n[[param]]\nmatch = "w"\nstrategy = "grid"\ngrid = [2, 2]\nreplicas = "first"\n',
    "column-parts": 'world_size = 8\n\n[[param]]\nmatch = "*w"\nstrategy = "column"\nparts = 2\n',
    "tensor-map": (
        'world_size = 4\n\n[[param]]\nmatch = "w"\nstrategy = "tensor_map"\n'
        "dev_matrix = [2, 2]\ntensor_map = [1, 0]\n\n[mirror]\nprefixes = [\"accu_grads.\"]\n"
    ),
    "mirror": 'world_size = 2\n\n[[param]]\nmatch = "w"\nstrategy = "row"\n\n[[param]]\nmatch = "moments.w"\nstrategy = "mirror"\nof = "w"\n',
    "replicate": 'world_size = 3\naccepted_errors = []\n\n[[param]]\nmatch = "b"\nstrategy = "replicate"\n',
}


def main() -> None:
    import mindspore as ms
    from mindspore import Tensor
    from mindspore.common import dtype as mstype

    for kind in ("ckpt", "safetensors", "plan"):
        (CORPUS / kind).mkdir(parents=True, exist_ok=True)

    weights = [
        {"name": "w", "data": Tensor(np.arange(8, dtype=np.float32).reshape(2, 4))},
        {"name": "b", "data": Tensor(np.array([1, 2], np.int32))},
        {"name": "mask", "data": Tensor(np.array([True, False]))},
        {"name": "step", "data": Tensor(np.array(7, np.int64))},
    ]
    bf16 = [{"name": "h", "data": Tensor(np.ones((2, 2), np.float32), dtype=mstype.bfloat16)}]
    ms.save_checkpoint(weights, str(CORPUS / "ckpt" / "seed-weights.ckpt"))
    ms.save_checkpoint(weights, str(CORPUS / "ckpt" / "seed-crc.ckpt"), crc_check=True)
    ms.save_checkpoint(bf16, str(CORPUS / "ckpt" / "seed-bf16.ckpt"), append_dict={"epoch_num": 2, "note": "x"})
    ms.save_checkpoint(weights, str(CORPUS / "safetensors" / "seed-weights"), format="safetensors")
    ms.save_checkpoint(weights, str(CORPUS / "safetensors" / "seed-crc"), format="safetensors", crc_check=True)
    for name, text in PLANS.items():
        (CORPUS / "plan" / f"seed-{name}.toml").write_text(text)
    for path in CORPUS.rglob("seed-*"):
        path.chmod(0o644)


if __name__ == "__main__":
    main()
