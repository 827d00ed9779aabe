"""`tensor_map`: MindSpore's own layout convention, as in its strategy files."""

from __future__ import annotations

import math

from ..errors import LayoutError
from ..hookspecs import hookimpl
from .base import Option, TensorMapStrategy


class TensorMap(TensorMapStrategy):
    name = "tensor_map"
    description = (
        "MindSpore's convention: rank r is the row-major index of its coordinate in dev_matrix; "
        "tensor_map[k] names the axis (0 = last) that splits dim k, -1 = not split."
    )
    options = {
        "dev_matrix": Option("int_list", "device matrix, outermost axis first; its product is the world size", minimum=1),
        "tensor_map": Option("tensor_map", "one entry per tensor dim: device axis counted from the last, or -1"),
    }

    def device_map(self, ndim, world_size, name):
        dev_matrix = self.values["dev_matrix"]
        if math.prod(dev_matrix) != world_size:
            raise LayoutError(
                f"dev_matrix {dev_matrix} holds {math.prod(dev_matrix)} ranks but the world size is {world_size}",
                param=name,
            )
        return dev_matrix, self.values["tensor_map"]


@hookimpl
def register_strategies(register):
    register(TensorMap)
