"""shardsmith: merge, split and reshard MindSpore model-parallel checkpoints by layout."""

__version__ = "0.1.0"
