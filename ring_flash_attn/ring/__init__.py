"""One ring engine (forward + backward); variants are layouts."""

from .engine import ContextParallelAttention, RingPlan, ring_backward, ring_forward
from .layouts import LAYOUTS, Layout, get_layout
from .planner import BlockTask, plan_step

__all__ = ["ContextParallelAttention", "RingPlan", "ring_backward", "ring_forward", "LAYOUTS", "Layout", "get_layout",
           "BlockTask", "plan_step"]
