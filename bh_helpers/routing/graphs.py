"""Patched blocks captured whole in CUDA graphs (decode and evaluation-sized prefill), owned by one ``route``.

A patched MoE block launches a few dozen kernels (router logits, fused selection, recorder
aggregates, sort and tile schedule, expert GEMMs, combine). At decode shapes, and on a fast GPU
at the prefill sizes the notebooks evaluate (8 x 256 tokens), the GPU finishes them faster than
the host issues them, so the block's time is launch time whatever k is. Replaying the whole block
as one CUDA graph removes the launches and leaves the kernels' own time, which follows the
selected pairs. :class:`BlockGraphs` holds one block's graphs per row count:

- up to ``GRAPH_MAX_TOKENS`` rows (decode), captured on first use;
- up to ``PREFILL_GRAPH_MAX_TOKENS`` rows (prefill of a fixed evaluation shape), captured the
  SECOND time a row count is seen in one ``route``, so a one-off prompt length never pays for a
  capture; larger calls are GPU-bound and run eagerly. Prefill graphs run on compute capability
  ``PREFILL_GRAPH_MIN_CAPABILITY`` and up (8.0 for now: on the T4 path, sm_75, they are checked on
  the GPU by lowering it to 7 in the tests and the k-scaling benchmark, not yet shipped on).

``route`` makes one per routed block; they share one memory pool, one static ``valid`` buffer and
one static input and output per row count (the blocks run one after another, so one set serves
all layers: memory does not grow with the number of layers), and are cleared on exit, so nothing
captured outlives the context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bh_helpers._cuda import capture_stream, device_capability
from bh_helpers.models.families import router_outputs_requested
from bh_helpers.routing.auto import sync_free_supported
from bh_helpers.routing.recorder import RoutingRecorder

__all__ = ["GRAPH_MAX_TOKENS", "PREFILL_GRAPH_MAX_TOKENS", "PREFILL_GRAPH_MIN_CAPABILITY", "BlockGraphs",
           "graph_safe_selector"]

#: Up to this many rows a block is captured on first use (decode steps).
GRAPH_MAX_TOKENS = 64
#: Up to this many rows a block is captured when the row count comes back (evaluation windows).
PREFILL_GRAPH_MAX_TOKENS = 4096
#: Prefill-sized graphs run from this compute capability major up (decode graphs run everywhere).
PREFILL_GRAPH_MIN_CAPABILITY = 8


def graph_safe_selector(selector: Any, device: torch.device) -> bool:
    """Whether ``selector`` is a pure, sync-free device function of the logits (capturable).

    The selector says so: :meth:`~bh_helpers.selection.selectors.Selector.capturable` (the
    ready-made fused selectors, TopKSelector/NativeSelector and BHSelector over a NullBank, when
    the Triton kernel runs on ``device`` and validation is off), or a ``graph_safe = True``
    attribute on any other callable.
    """
    if getattr(selector, "graph_safe", False) is True:
        return True
    capturable = getattr(selector, "capturable", None)
    return callable(capturable) and capturable(device) is True


class _BlockGraph:
    """One patched block forward for one row count ``T``, captured in a CUDA graph.

    Static inputs: ``hidden (T, H)`` and ``valid (T,)`` (long); static outputs: the block output,
    copied into ``out (T, H)``, and the per-token counts ``(T,)`` int16. ``hidden`` and ``out`` are
    shared by the route's blocks (see :meth:`BlockGraphs.static_io`). The graph also reads the
    cached float32 router weight, the expert weights, the selector's device tables, and adds into
    the recorder's aggregate buffers in place; ``key`` holds the addresses it depends on.
    """

    def __init__(self, compute: Callable, hidden: torch.Tensor, out: torch.Tensor, valid: torch.Tensor,
                 hist: torch.Tensor, experts: torch.Tensor, faults: torch.Tensor, key: tuple, pool: Any) -> None:
        device = hidden.device
        self.key = key
        self.hidden, self.out = hidden, out  # (T, H) each, static
        self.valid = valid  # (T,) long, shared by the blocks of one route
        stream = capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up into scratch aggregates: compilation, tables, handles
                compute(self.hidden, self.valid, torch.zeros_like(hist), torch.zeros_like(experts),
                        torch.zeros_like(faults))
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            result, self.counts = compute(self.hidden, self.valid, hist, experts, faults)
            self.out.copy_(result)  # the block's own output buffer is pool memory the next capture reuses

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.hidden.copy_(hidden)
        self.graph.replay()
        return self.out.clone(), self.counts.clone()


class BlockGraphs:
    """The captured graphs of one routed block, per row count; dropped when ``route`` exits."""

    __slots__ = ("disabled", "graphs", "seen", "shared")

    def __init__(self, shared: dict | None = None) -> None:
        # shared (one per route): "pool" and, per key, [static valid (T,), its current source]
        self.shared: dict = {} if shared is None else shared
        self.clear()

    def clear(self) -> None:
        self.graphs: dict[tuple, _BlockGraph] = {}
        self.seen: set[tuple] = set()  # prefill row counts met once (captured when they come back)
        self.disabled = False
        self.shared.clear()

    def static_io(self, key: tuple, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The route's static block input and output ``(T, H)`` for ``key``, shared by its blocks."""
        entry = self.shared.get(("io", key))
        if entry is None:
            entry = (hidden.detach().clone(), torch.empty_like(hidden))
            self.shared[("io", key)] = entry
        else:
            entry[0].copy_(hidden)
        return entry

    def valid(self, key: tuple, source: torch.Tensor) -> torch.Tensor:
        """The route's static ``valid`` buffer for ``key``, holding ``source`` (copied once per call)."""
        entry = self.shared.get(key)
        if entry is None:
            entry = [torch.empty_like(source), None]
            self.shared[key] = entry
        if entry[1] is not source:
            entry[0].copy_(source)
            entry[1] = source
        return entry[0]

    def pool(self) -> Any:
        if "pool" not in self.shared:
            self.shared["pool"] = torch.cuda.graph_pool_handle()
        return self.shared["pool"]

    def run(self, module: nn.Module, hidden: torch.Tensor, *, layer: int, selector: Any, recorder: RoutingRecorder,
            gate_cache: Any, compute: Callable) -> torch.Tensor | None:
        """The block output ``(T, H)`` through this block's CUDA graph for ``T`` rows, or None (run eager).

        Captures on first use per decode-sized row count, on the second use per prefill-sized one
        (and again when an address the graph reads changed);
        anything that cannot be captured turns the graphs of this block off for the rest of the
        ``route``. ``compute(module, weight, hidden, valid, hist, experts_count, faults)`` is the patched
        forward's device part; its per-token counts go to ``recorder``.
        """
        device = hidden.device
        if (
            self.disabled
            or device.type != "cuda"
            or hidden.shape[0] > PREFILL_GRAPH_MAX_TOKENS
            or hidden.shape[0] == 0
            or torch.is_grad_enabled()
            or torch.cuda.is_current_stream_capturing()
            or router_outputs_requested()
            or "_hf_hook" in vars(module)
            or "_hf_hook" in vars(module.experts)
        ):
            return None
        experts = module.experts
        width = getattr(selector, "max_k", None)
        if not (sync_free_supported(experts, device) and graph_safe_selector(selector, device)) or not isinstance(
            width, int
        ):
            return None
        weight = gate_cache.weight_for(module, device)  # (E, H) float32, a stable buffer
        if weight is None:
            return None
        rows = hidden.shape[0]
        if rows > GRAPH_MAX_TOKENS and device_capability(device)[0] < PREFILL_GRAPH_MIN_CAPABILITY:
            return None  # prefill graphs of the T4 path (sm_75, Triton tiled dispatch): not shipped on yet
        key = (rows, hidden.dtype, device, torch.is_inference_mode_enabled())
        graph = self.graphs.get(key)
        if graph is None and rows > GRAPH_MAX_TOKENS and key not in self.seen:
            self.seen.add(key)  # a prefill size met once: eager; captured if it comes back
            return None
        inputs = recorder.inputs_for(rows, device)
        valid_long, _ = recorder.valid_for(inputs, device)
        hist, experts_count, faults = recorder.buffers(layer, width, device)
        deps = (weight.data_ptr(), experts.gate_up_proj.data_ptr(), experts.down_proj.data_ptr(),
                hist.data_ptr(), hist.numel(), experts_count.data_ptr(), faults.data_ptr())
        valid = self.valid(key, valid_long)  # (T,) static, shared by the route's blocks
        if graph is None or graph.key != deps:
            self.graphs.pop(key, None)
            static_in, static_out = self.static_io(key, hidden)
            try:
                graph = _BlockGraph(lambda h, v, hs, ex, fa: compute(module, weight, h, v, hs, ex, fa), static_in,
                                    static_out, valid, hist, experts_count, faults, deps, self.pool())
            except Exception:  # noqa: BLE001 - anything not capturable: eager from now on
                self.disabled = True
                return None
            self.graphs[key] = graph
        out, counts16 = graph(hidden)
        recorder.store_tokens(layer, inputs, counts16)
        return out
