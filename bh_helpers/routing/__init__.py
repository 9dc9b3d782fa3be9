"""Routing: ``route`` changes which experts a model computes with, and restores it exactly.

- :mod:`bh_helpers.routing.patch`     ``route`` and the patched block forward
- :mod:`bh_helpers.routing.recorder`  what the routed model chose (aggregates, per-token counts)
- :mod:`bh_helpers.routing.dispatch`  the reference dispatch of variable-k selections (any device)
- :mod:`bh_helpers.routing.grouped`   grouped-GEMM dispatch (bf16/fp16, sm80+)
- :mod:`bh_helpers.routing.turing`    the T4 path: Triton GEMV decode, tiled grouped GEMM, per-expert loop
- :mod:`bh_helpers.routing.auto`      picks the fastest dispatch the device and tensors allow
- :mod:`bh_helpers.routing.graphs`    decode-sized blocks captured whole in CUDA graphs, owned by ``route``
"""

from bh_helpers.routing.patch import MODES, route
from bh_helpers.routing.recorder import RoutingRecorder, TokenCounts

__all__ = ["MODES", "RoutingRecorder", "TokenCounts", "route"]
