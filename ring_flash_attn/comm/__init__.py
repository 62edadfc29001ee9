"""Process groups, backend choice, ring P2P and launcher environments."""

from .backend import choose_backend, default_device_type
from .launch import LaunchInfo, detect_launch, init_distributed
from .ring import PendingExchange, RingComm

__all__ = ["choose_backend", "default_device_type", "LaunchInfo", "detect_launch", "init_distributed",
           "PendingExchange", "RingComm"]
