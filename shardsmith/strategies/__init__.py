"""Layout strategies: the interface (`base`) and the built-in ones, each registered as a plugin."""

from .base import LayoutContext, Option, Strategy, TensorMapStrategy

__all__ = ["LayoutContext", "Option", "Strategy", "TensorMapStrategy"]
