"""Jobs that run inside a MindSpore distributed job (msrun), one process per rank.

- `shardsmith gather` (`gather.run_gather`): each worker reads only its own rank's file, the
  slices are AllGathered, and rank 0 writes the full checkpoint `shardsmith merge` would write.
- `gather_params`: the same for parameters already in memory, inside a training script.
- `load_rank_slice`: this rank's parameters under a plan, from a full checkpoint or from a rank
  set of another size, ready for `mindspore.load_param_into_net`.
- `distributed.run_distributed`: merge, split or reshard with the work divided over workers.

This is the only part of shardsmith that uses MindSpore, and it imports it only when a function
runs, so importing this package stays cheap.
"""

from .gather import gather_params, run_gather
from .load import load_rank_slice

__all__ = ["gather_params", "load_rank_slice", "run_gather"]
