"""The public entry points run outside ``torch.compile`` graphs.

A call exchanges tensors between ranks (process-group communication) and makes host-side decisions every rank
must share (the cross-rank agreement, the plan of kernel calls read from ``cu_seqlens``, which backend serves
the call): none of it can be captured in a graph. Dynamo used to trace into it, guessing at the host-side
decisions, and with ``fullgraph=True`` stopped on a data-dependent guard whose message named none of this. Now
Dynamo never inlines an entry point: a compiled caller breaks its graph around the call, which runs eagerly
(its kernels are PyTorch's fused ops or our own either way), and ``fullgraph=True`` raises saying why.

The check costs nothing in a process that never compiles: Dynamo (seconds to import) is only used once it is
loaded.
"""

from __future__ import annotations

import functools
import sys

REASON = ("ring_flash_attn's attention runs outside torch.compile graphs: its exchanges between ranks "
          "(process-group communication) and the ranks' host-side agreement on the call cannot be captured in a "
          "graph. Compile with fullgraph=False: Dynamo then compiles the code around the call and runs the call "
          "itself eagerly")

_disabled: dict = {}  # entry point -> torch._dynamo.disable of it, made once Dynamo is loaded


def outside_graphs(fn):
    """Decorate a public entry point so that Dynamo runs it eagerly between graphs (module docstring)."""

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None:  # nothing in this process has compiled: no graph to step out of
            return fn(*args, **kwargs)
        disabled = _disabled.get(fn)
        if disabled is None:
            try:
                disabled = dynamo.disable(fn, reason=REASON)
            except TypeError:  # a torch whose disable() takes no reason
                disabled = dynamo.disable(fn)
            _disabled[fn] = disabled
        return disabled(*args, **kwargs)

    # What torch._dynamo.disable marks: Dynamo does not inline a call to ``entry`` (a graph break; with
    # fullgraph=True an error quoting REASON), without importing Dynamo here.
    entry._torchdynamo_disable = True
    entry._torchdynamo_disable_msg = REASON
    return entry
