"""Fuzz the .safetensors reader: any input must open cleanly or raise a ShardsmithError.

    python fuzz/fuzz_safetensors.py /tmp/fuzz/safetensors fuzz/corpus/safetensors -max_total_time=600 -rss_limit_mb=1024 -dict=fuzz/safetensors.dict
"""

import sys

import atheris

with atheris.instrument_imports(include=["shardsmith"]):
    from shardsmith.errors import ShardsmithError
    from shardsmith.formats import open_checkpoint

from harness import read_every_entry, scratch_path, write_input

PATH = scratch_path(".safetensors")


def test_one_input(data: bytes) -> None:
    write_input(PATH, data)
    try:
        with open_checkpoint(PATH, "safetensors") as reader:
            read_every_entry(reader)
    except ShardsmithError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
