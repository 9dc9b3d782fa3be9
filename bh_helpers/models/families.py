"""Find the mixture-of-experts blocks of a model and describe each architecture family.

The router-and-experts layout of transformers v5 is shared by the families supported here: a
block holds ``gate`` (a top-k router whose ``weight`` is ``[E, H]``) and ``experts`` (3-D
``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``). What differs between families is
small and lives in one adapter class each:

- how the native router mixes the chosen experts (``norm_topk_prob``: renormalised top-k
  probabilities, or the raw softmax probabilities over all experts),
- whether the block adds a shared expert (Qwen2-MoE: ``sigmoid(shared_expert_gate(h)) *
  shared_expert(h)``).

Blocks are detected structurally (the layout above) and then matched to a family by class name;
a model with no such block, or with blocks of an unknown family, raises a ``ValueError`` listing
the supported families rather than being routed by guesswork.

Accelerate offloading (``device_map="auto"`` with CPU or disk offload) keeps offloaded weights on
the ``meta`` device between calls and loads them in a hook that only runs when the submodule
itself is called. The patcher reads ``gate.weight`` and the expert weights directly, so
:func:`materialized` runs those hooks around the direct access.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bh_helpers._validate import is_int

__all__ = [
    "check_window_fits",
    "context_length",
    "fingerprints_differ",
    "router_fingerprint",
    "ADAPTERS",
    "SUPPORTED_FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "LayerSpec",
    "MoEAdapter",
    "MoEShape",
    "MoEBlock",
    "MixtralAdapter",
    "OlmoeAdapter",
    "Qwen2MoeAdapter",
    "Qwen3MoeAdapter",
    "find_moe_blocks",
    "materialized",
    "moe_shape",
    "router_logits",
    "router_outputs_requested",
    "select_layers",
]

#: A layer selection: all layers (None), one index, a list of indices, or a predicate.
LayerSpec = int | Sequence[int] | Callable[[int], bool] | None

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class MoEAdapter:
    """What the patcher needs to know about one architecture family.

    Subclasses set ``family`` (the transformers ``config.model_type``, checked before any weights
    are downloaded), ``display_name`` (for messages) and ``block_classes`` (class names of the sparse
    MoE block), and override :meth:`native_weights` / :meth:`shared_output` where the family differs.
    """

    family: str = ""
    display_name: str = ""
    block_classes: tuple[str, ...] = ()

    def matches(self, block: nn.Module) -> bool:
        """Whether ``block`` is a sparse MoE block of this family."""
        return type(block).__name__ in self.block_classes

    def num_experts(self, block: nn.Module) -> int:
        """Number of routed experts ``E``."""
        return int(block.gate.weight.shape[0])

    def native_k(self, block: nn.Module) -> int:
        """Number of experts the native router picks per token."""
        return int(block.gate.top_k)

    def native_weights(self, block: nn.Module) -> str:
        """The native mixing convention, as a ``select_experts`` ``weights`` mode."""
        return "renorm" if bool(getattr(block.gate, "norm_topk_prob", True)) else "softmax"

    def shared_output(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        """Output ``[T, H]`` of the always-on shared expert(s), or None when the family has none."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class OlmoeAdapter(MoEAdapter):
    """OLMoE: softmax over all experts, then top-k; ``norm_topk_prob`` (False for OLMoE-1B-7B)."""

    family = "olmoe"
    display_name = "OLMoE"
    block_classes = ("OlmoeSparseMoeBlock",)


class MixtralAdapter(MoEAdapter):
    """Mixtral: softmax, top-k, and the top-k probabilities are always renormalised.

    Router jitter noise (training only) is not reproduced: routing is an inference-time change.
    """

    family = "mixtral"
    display_name = "Mixtral"
    block_classes = ("MixtralSparseMoeBlock",)

    def native_weights(self, block: nn.Module) -> str:
        # MixtralTopKRouter has no norm_topk_prob flag: it always divides by the top-k sum.
        return "renorm"


class Qwen2MoeAdapter(MoEAdapter):
    """Qwen2-MoE: routed experts as OLMoE plus one shared expert behind a sigmoid gate."""

    family = "qwen2_moe"
    display_name = "Qwen2-MoE"
    block_classes = ("Qwen2MoeSparseMoeBlock",)

    def shared_output(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        # Called as modules (not by reading weights) so that any accelerate hooks on them run.
        shared = block.shared_expert(hidden)  # (T, H)
        gate = F.sigmoid(block.shared_expert_gate(hidden))  # (T, 1)
        return gate * shared  # (T, H)


class Qwen3MoeAdapter(MoEAdapter):
    """Qwen3-MoE: as OLMoE (softmax, top-k, ``norm_topk_prob``, True for released checkpoints)."""

    family = "qwen3_moe"
    display_name = "Qwen3-MoE"
    block_classes = ("Qwen3MoeSparseMoeBlock",)


#: One adapter instance per supported family, tried in this order.
ADAPTERS: tuple[MoEAdapter, ...] = (OlmoeAdapter(), MixtralAdapter(), Qwen2MoeAdapter(), Qwen3MoeAdapter())
#: Family names (transformers ``model_type``), for error messages and documentation.
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(a.family for a in ADAPTERS)
#: ``config.model_type`` -> display name of every supported family (the one registry of families).
SUPPORTED_MODEL_TYPES: dict[str, str] = {a.family: a.display_name for a in ADAPTERS}


#: Config attribute naming the routed-expert count, per family: OLMoE and Qwen-MoE ``num_experts``,
#: Mixtral ``num_local_experts``, DeepSeek ``n_routed_experts`` (the first one present is read).
_EXPERT_COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class MoEShape:
    """Layer, expert and top-k counts of a mixture-of-experts config (see :func:`moe_shape`).

    Attributes
    ----------
    num_layers : int
        Decoder layers (``num_hidden_layers``; dense layers of a partly dense model included).
    num_experts : int
        Routed experts per MoE layer.
    top_k : int
        Experts the native router picks per token (``num_experts_per_tok``).
    """

    num_layers: int
    num_experts: int
    top_k: int


def moe_shape(config: Any) -> MoEShape:
    """The layer, expert and top-k counts of a MoE config: the one reader of them in the package.

    Parameters
    ----------
    config : transformers config, or a model
        Anything with ``num_hidden_layers``, ``num_experts_per_tok`` and an expert count
        (``num_experts``, ``num_local_experts`` or ``n_routed_experts``); a model's ``.config``
        is read.

    Returns
    -------
    MoEShape

    Raises
    ------
    ValueError
        When a count is missing or not a positive integer: ``config`` is not a MoE config.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> moe_shape(SimpleNamespace(num_hidden_layers=16, num_experts=64, num_experts_per_tok=8))
    MoEShape(num_layers=16, num_experts=64, top_k=8)
    """
    config = getattr(config, "config", config)
    experts = next((getattr(config, n) for n in _EXPERT_COUNT_NAMES if getattr(config, n, None) is not None), None)
    counts = {"num_hidden_layers": getattr(config, "num_hidden_layers", None), "num_experts": experts,
              "num_experts_per_tok": getattr(config, "num_experts_per_tok", None)}
    bad = [name for name, value in counts.items() if not (is_int(value) and value > 0)]
    if bad:
        raise ValueError(
            f"`config` must be a mixture-of-experts config with positive integer `num_hidden_layers`, "
            f"`num_experts_per_tok` and an expert count ({' / '.join(f'`{n}`' for n in _EXPERT_COUNT_NAMES)}); "
            f"{type(config).__name__} has {', '.join(f'{n}={counts[n]!r}' for n in bad)}."
        )
    return MoEShape(num_layers=int(counts["num_hidden_layers"]), num_experts=int(experts),
                    top_k=int(counts["num_experts_per_tok"]))


@dataclass(frozen=True)
class MoEBlock:
    """One sparse MoE block found in a model.

    Attributes
    ----------
    layer : int
        Index of the decoder layer holding the block (``model.layers[layer].mlp``).
    name : str
        Qualified module name, e.g. ``"model.layers.3.mlp"``.
    module : nn.Module
        The block itself.
    adapter : MoEAdapter
        Its family adapter.
    """

    layer: int
    name: str
    module: nn.Module
    adapter: MoEAdapter

    @property
    def num_experts(self) -> int:
        return self.adapter.num_experts(self.module)

    @property
    def native_k(self) -> int:
        return self.adapter.native_k(self.module)

    @property
    def native_weights(self) -> str:
        return self.adapter.native_weights(self.module)


def _looks_like_moe_block(module: nn.Module) -> bool:
    """Structural test: a router with an ``[E, H]`` weight and experts with 3-D weight banks."""
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    if gate is None or experts is None:
        return False
    weight = getattr(gate, "weight", None)
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and isinstance(gate_up, torch.Tensor)
        and gate_up.dim() == 3
        and isinstance(down, torch.Tensor)
        and down.dim() == 3
    )


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """All sparse MoE blocks of ``model``, ordered by layer.

    Parameters
    ----------
    model : nn.Module
        A transformers causal LM (or its base model) of a supported family.

    Returns
    -------
    list of MoEBlock
        One entry per MoE layer; dense layers (e.g. Qwen ``mlp_only_layers``) are absent.

    Raises
    ------
    ValueError
        When the model has no MoE block, or a block of an unsupported family; the message lists
        the supported families.
    """
    blocks: list[MoEBlock] = []
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if not _looks_like_moe_block(module):
            continue
        adapter = next((a for a in ADAPTERS if a.matches(module)), None)
        if adapter is None:
            unsupported.append(type(module).__name__)
            continue
        found = _LAYER_INDEX.search(name + ".")
        if found is None:
            raise ValueError(f"MoE block {name!r} is not under a `layers.<i>` module list; cannot number it.")
        blocks.append(MoEBlock(layer=int(found.group(1)), name=name, module=module, adapter=adapter))
    if unsupported or not blocks:
        what = (
            f"MoE blocks of unsupported classes {sorted(set(unsupported))}"
            if unsupported
            else f"no mixture-of-experts block in {type(model).__name__}"
        )
        raise ValueError(f"Found {what}. Supported families: {', '.join(SUPPORTED_FAMILIES)}.")
    layers = [b.layer for b in blocks]
    if len(set(layers)) != len(layers):
        raise ValueError(f"Several MoE blocks share a layer index ({layers}); pass the causal LM itself.")
    return sorted(blocks, key=lambda b: b.layer)


def select_layers(blocks: Iterable[MoEBlock], layers: LayerSpec) -> list[MoEBlock]:
    """The blocks whose layer index is chosen by ``layers``.

    Parameters
    ----------
    blocks : iterable of MoEBlock
        From :func:`find_moe_blocks`.
    layers : None, int, sequence of int, or callable
        None: every block; an int or a list of ints: those layer indices (each must be an MoE
        layer); a predicate ``layer -> bool``.

    Raises
    ------
    ValueError
        For an index that is not an MoE layer, or when nothing is selected.
    """
    blocks = list(blocks)
    available = [b.layer for b in blocks]
    if layers is None:
        chosen = blocks
    elif callable(layers):
        chosen = [b for b in blocks if layers(b.layer)]
    else:
        wanted = [layers] if isinstance(layers, int) else list(layers)
        if not all(is_int(i) for i in wanted):
            raise ValueError(f"`layers` must be ints, a list of ints or a predicate; got {layers!r}.")
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise ValueError(f"`layers` {missing} are not MoE layers of this model; MoE layers are {available}.")
        chosen = [b for b in blocks if b.layer in set(wanted)]
    if not chosen:
        raise ValueError(f"`layers`={layers!r} selects no MoE layer; MoE layers are {available}.")
    return chosen


@contextmanager
def materialized(module: nn.Module) -> Iterator[None]:
    """Make an accelerate-offloaded module's own weights real for the duration of the block.

    A no-op for modules without an accelerate hook. With one, runs the hook's ``pre_forward``
    (loads offloaded weights onto the execution device) and, always, its ``post_forward``
    (offloads them again), as a call of the module would.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        yield
        return
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)


def router_logits(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Router logits ``[T, E]`` in float32, computed from the block input.

    Computed here rather than taken from the router's return value, whose contract changed across
    transformers v5 releases; float32 because p-values (and BH ties) need it.

    Parameters
    ----------
    block : nn.Module
        A sparse MoE block (with ``gate.weight`` ``[E, H]``).
    hidden : torch.Tensor, shape ``[..., H]``
        The block input (the post-attention-layernorm output).
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
    with materialized(block.gate):
        weight = block.gate.weight  # (E, H)
        return F.linear(h.float(), weight.to(device=h.device, dtype=torch.float32))  # (T, E)


def router_outputs_requested() -> bool:
    """Whether the running forward call records router outputs (``output_router_logits=True``).

    transformers 5.23 collects ``router_logits`` with a forward hook on the router module, which
    a patched block never calls; without the router call, ``output_router_logits=True`` fails
    (``IndexError`` in the aux-loss computation). This reads transformers' collector, a private
    context variable; if it moves in a later release the answer is a conservative True (the
    router then runs on every patched call, a small cost).
    """
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return True
    try:
        collected = _active_collector.get()
    except Exception:  # a private API: anything unexpected means "assume yes"
        return True
    return collected is not None and "router_logits" in collected


#: Experts whose router projections enter the fingerprint (with the weight's spread).
_FINGERPRINT_EXPERTS = 8


def router_fingerprint(model: nn.Module, layers: Sequence[int] | None = None) -> dict[int, list[float]]:
    """A few numbers per MoE layer that tell one model's routers from another's, across dtypes.

    Per layer: the router weight's standard deviation and mean absolute value, and the first
    :data:`_FINGERPRINT_EXPERTS` experts' projections on a fixed pseudo-random direction (float64
    on the CPU), then the model's routing settings (experts per token, renormalised top-k
    weights). A float32 checkpoint cast to float16 or bf16 keeps them within 1%; another model,
    the same weights with experts in another order, or another ``num_experts_per_tok``, does not.
    Layers whose weight is not materialised (``meta``, offloaded) are left out.

    Parameters
    ----------
    model : nn.Module
    layers : sequence of int, optional
        MoE layers to include (default all).

    Returns
    -------
    dict of int to list of float
    """
    out = {}
    for block in find_moe_blocks(model):
        if layers is not None and block.layer not in layers:
            continue
        weight = block.module.gate.weight
        if weight.device.type == "meta":
            continue
        w = weight.detach().to("cpu", torch.float64)  # (E, H)
        direction = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        proj = (w[:_FINGERPRINT_EXPERTS] @ direction).tolist()  # (8,)
        out[block.layer] = [float(w.std()), float(w.abs().mean()), *proj, *_routing_settings(model)]
    return out


#: Numbers of a fingerprint that describe the router weights; those after them are routing settings.
_ROUTER_NUMBERS = 2 + _FINGERPRINT_EXPERTS


def _routing_settings(model: nn.Module) -> list[float]:
    """Experts per token and whether the top-k weights are renormalised: a config.json edited from 8 to 4
    experts changes every later layer's router inputs (captured logits moved by up to 5.7), not its weights."""
    config = getattr(model, "config", None)
    k = getattr(config, "num_experts_per_tok", None)
    return [] if not isinstance(k, int) else [float(k), float(bool(getattr(config, "norm_topk_prob", False)))]


def fingerprints_differ(fitted: Mapping[int, Sequence[float]], model: Mapping[int, Sequence[float]],
                        rtol: float = 1e-2) -> list[int]:
    """Layers (present in both) whose fingerprints differ by more than ``rtol`` of the layer's scale."""
    differ = []
    for layer in sorted(set(fitted) & set(model)):
        a = torch.tensor(fitted[layer], dtype=torch.float64)
        b = torch.tensor(model[layer], dtype=torch.float64)
        # the router weights within rtol; the routing settings exactly where both record them (older
        # fingerprints, and the engines' weight-only ones, have none)
        ra, rb, sa, sb = a[:_ROUTER_NUMBERS], b[:_ROUTER_NUMBERS], a[_ROUTER_NUMBERS:], b[_ROUTER_NUMBERS:]
        scale = torch.maximum(ra.abs().max(), rb.abs().max())
        if ra.shape != rb.shape or ((ra - rb).abs() > rtol * scale).any() or \
                (sa.numel() and sb.numel() and not torch.equal(sa, sb)):
            differ.append(layer)
    return differ


def context_length(model: Any) -> int | None:
    """The context length of a model, or of its config (so that a window is checked before loading)."""
    return getattr(getattr(model, "config", model), "max_position_embeddings", None)


def check_window_fits(model: Any, window: int) -> None:
    """Refuse a ``window`` longer than the model's context (positions past it give logits of no real use).

    The one check of it: scoring's :func:`~bh_helpers.evaluation.scoring.resolve_window` and the capture
    run it. ValueError naming `window`.
    """
    limit = context_length(model)
    if isinstance(limit, int) and window > limit:
        raise ValueError(f"`window` {window} is longer than the model's context of {limit} tokens (its "
                         f"max_position_embeddings); pass a `window` of {limit} or less.")
