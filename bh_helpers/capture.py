"""Log router logits of every MoE layer with forward hooks.

Each MoE block gets a forward pre-hook that recomputes the router logits from the block input,
``F.linear(h.float(), gate.weight.float())`` (float32, and independent of the router's return
value, whose contract changed across transformers v5 releases). Note that ``output_hidden_states``
is NOT the block input: the block sees the post-attention-layernorm output of its layer.

Rows are tokens: padding (``attention_mask == 0``) is dropped, and the same rows are kept in
every layer, so ``captured[l][i]`` and ``captured.token_ids[i]`` describe one token. With a cap on
tokens, a uniform random subset is kept (a reservoir by random priority keys: every token draws one
key, shared by all layers, and the ``cap`` smallest keys survive), bounded in memory at about two
caps per layer.

Hooks are GLOBAL state on the model: they are installed and removed inside one ``try/finally``,
so an exception in the forward pass never leaves them behind.

Why one module: the hooks, the file format (:class:`CapturedLogits`) and the calibration protocol
(:func:`capture_calibration`: the one input every null bank is fitted on) are one contract; a
reader checking what a bank was fitted on reads them together.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bh_helpers._locks import new_output, refuse_existing
from bh_helpers._validate import LARGEST_LOGIT, check_int, existing_file
from bh_helpers.models.families import (LayerSpec, check_window_fits, find_moe_blocks, router_fingerprint, router_logits,
                                        select_layers)
from bh_helpers.models.texts import calibration_token_ids, read_text_file

__all__ = [
    "CAPTURE_FORMAT",
    "MIN_CALIBRATION_TOKENS",
    "CapturedLogits",
    "capture_calibration",
    "check_capture",
    "capture_router_logits",
    "header_value",
    "split_by_sequence",
]

#: ``format`` entry of the header of every capture file (:meth:`CapturedLogits.save`).
CAPTURE_FORMAT = "bh_helpers.CapturedLogits"
#: Fewest calibration tokens a capture takes (a null needs two values per expert column).
MIN_CALIBRATION_TOKENS = 2
#: Tensors besides ``layer.<i>`` that every capture file holds.
_ROW_TENSORS = ("token_ids", "positions", "sequence_index")
#: Header field holding the SHA-256 of every tensor and every other header field (an edited layer, a
#: swapped pair of layers, a deleted fingerprint would otherwise load and calibrate quietly).
CAPTURE_DIGEST = "capture_sha256"


def _capture_digest(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> str:
    """SHA-256 over the tensors (name, dtype, shape, bytes) and the header fields but the digest itself."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    for key in sorted(k for k in header if k != CAPTURE_DIGEST):
        digest.update(f"{key}={header[key]}\n".encode())
    return digest.hexdigest()


def header_value(value: Any) -> str:
    """How :meth:`CapturedLogits.save` stores a metadata value: ``str`` as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _header_fingerprint(header: Mapping[str, str], path: str | os.PathLike) -> dict[int, list[float]] | None:
    """The router fingerprint a capture's header records (None when it has none), read exactly once."""
    if "router_fingerprint" not in header:
        return None
    try:
        return {int(k): [float(x) for x in v] for k, v in json.loads(header["router_fingerprint"]).items()}
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{str(path)!r}: the capture's router_fingerprint is unreadable: the file is damaged or was "
                         "edited after `bh-routing capture`; capture again.") from None


def check_capture_model(header: Mapping[str, str], model: nn.Module, path: str | os.PathLike) -> None:
    """Raise ValueError when a capture's router fingerprint (``header``, from :meth:`CapturedLogits.load`)
    is not ``model``'s: alphas solved on another model's logits miss their compute target quietly.

    A capture without a fingerprint (written through the API without one) is not checked.
    """
    from bh_helpers.models.families import fingerprints_differ

    fitted = _header_fingerprint(header, path) or {}
    differ = fingerprints_differ(fitted, router_fingerprint(model, layers=list(fitted))) if fitted else []
    if differ:
        raise ValueError(f"{str(path)!r} holds router logits of another model (its routers, weights or routing settings, differ at layers "
                         f"{differ}): capture the calibration logits with this model (`bh-routing capture`).")


# ----------------------------------------------------------------------------------------------
# What went into the model: shared with bh_helpers.routing.patch
# ----------------------------------------------------------------------------------------------


@dataclass
class ForwardInputs:
    """Token-level view of one model forward call, flattened to the ``B * S`` rows MoE blocks see.

    Attributes
    ----------
    call : int
        Running number of the forward call.
    valid : torch.BoolTensor, shape ``[B * S]``
        False at padding rows.
    token_ids : torch.LongTensor, shape ``[B * S]``
        Input ids (``-1`` when the call passed ``inputs_embeds``).
    positions : torch.LongTensor, shape ``[B * S]``
        Position of each token in its sequence, padding excluded (left padding gives 0 to the
        first real token).
    sequence : torch.LongTensor, shape ``[B * S]``
        Row of each token in the call's batch.
    """

    call: int
    valid: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor
    sequence: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.valid.numel()


def _arg(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def forward_inputs(call: int, args: tuple, kwargs: dict) -> ForwardInputs | None:
    """Read ``input_ids``/``attention_mask`` of a causal-LM forward call (as in a pre-hook).

    Returns None when the call passes neither ``input_ids`` nor ``inputs_embeds``.
    """
    input_ids = _arg(args, kwargs, "input_ids", 0)
    mask = _arg(args, kwargs, "attention_mask", 1)
    embeds = kwargs.get("inputs_embeds")
    if input_ids is not None:
        batch, seq = input_ids.shape
        device = input_ids.device
    elif embeds is not None:
        batch, seq = embeds.shape[:2]
        device = embeds.device
    else:
        return None
    # During cached decoding the mask covers past + new tokens: the new ones are the last S columns.
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= seq:
        keep = mask.to(device=device).bool()  # (B, L)
        positions = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]  # (B, S)
        valid = keep[:, -seq:]  # (B, S)
    else:
        cache_position = kwargs.get("cache_position")
        start = int(cache_position[0]) if isinstance(cache_position, torch.Tensor) and cache_position.numel() else 0
        positions = (torch.arange(seq, device=device) + start).expand(batch, seq)  # (B, S)
        valid = torch.ones(batch, seq, dtype=torch.bool, device=device)  # (B, S)
    ids = input_ids if input_ids is not None else torch.full((batch, seq), -1, dtype=torch.long, device=device)
    sequence = torch.arange(batch, device=device).unsqueeze(1).expand(batch, seq)  # (B, S)
    return ForwardInputs(
        call=call,
        valid=valid.reshape(-1),  # (B*S,)
        token_ids=ids.reshape(-1).long(),  # (B*S,)
        positions=positions.reshape(-1),  # (B*S,)
        sequence=sequence.reshape(-1),  # (B*S,)
    )


# ----------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CapturedLogits(Mapping):
    """Router logits per layer, row-aligned with the tokens that produced them.

    Behaves like ``{layer: Tensor[N, E]}`` (a read-only mapping, so it can be passed wherever a
    dict of logits is expected, e.g. ``fit_null_bank``); ``token_ids[i]``, ``positions[i]`` and
    ``sequence_index[i]`` describe row ``i`` of every layer.

    Attributes
    ----------
    logits : dict of int to torch.Tensor
        float32 CPU tensors ``[N, E]``, one per captured layer.
    token_ids : torch.LongTensor, shape ``[N]``
        Input id of each row.
    positions : torch.LongTensor, shape ``[N]``
        Position of the token in its sequence (padding excluded).
    sequence_index : torch.LongTensor, shape ``[N]``
        Index of the sequence over all batches (batch rows counted in order).
    total_tokens : int
        Non-padding tokens seen before subsampling.
    router_fingerprint : dict of int to list of float or None
        :func:`~bh_helpers.models.families.router_fingerprint` of the model that gave the logits
        (set by :func:`capture_router_logits` and :meth:`load`); a bank fitted on the capture
        records it, so that ``route`` can refuse the bank on another model.
    """

    logits: dict[int, torch.Tensor]
    token_ids: torch.Tensor
    positions: torch.Tensor
    sequence_index: torch.Tensor
    total_tokens: int = 0
    router_fingerprint: dict[int, list[float]] | None = field(default=None, repr=False)
    layers: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.layers = sorted(self.logits)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.logits[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.logits)

    @property
    def num_tokens(self) -> int:
        """Number of rows ``N`` (after subsampling)."""
        return int(self.token_ids.numel())

    def save(self, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write the logits as safetensors (no pickle): ``layer.<i>`` float32 ``[N, E]``, ``token_ids``,
        ``positions``, ``sequence_index``, and ``metadata`` in the header.

        Header values are strings: ``str`` values as they are, anything else as JSON (read it back
        with :func:`header_value` to compare). The file is written beside ``path`` and renamed, so
        a reader never sees half of it.
        """
        from safetensors.torch import save

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer.{layer}": self[layer].to(torch.float32).contiguous() for layer in self}
        tensors["token_ids"] = self.token_ids.long().contiguous()
        tensors["positions"] = self.positions.long().contiguous()
        tensors["sequence_index"] = self.sequence_index.long().contiguous()
        header = {"format": CAPTURE_FORMAT, "total_tokens": str(int(self.total_tokens))}
        if self.router_fingerprint is not None:
            header["router_fingerprint"] = header_value({str(k): v for k, v in self.router_fingerprint.items()})
        header.update({k: header_value(v) for k, v in (metadata or {}).items()})
        header[CAPTURE_DIGEST] = _capture_digest(tensors, header)
        tmp = path.with_name(path.name + ".tmp")
        try:  # written by Python, not safetensors' save_file: a full disk is an OSError (ENOSPC), not a SafetensorError
            with open(tmp, "wb") as fh:
                fh.write(save(tensors, metadata=header))
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # no half-written file left behind
            raise
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, num_experts: int | None = None,
             of: str = "the model") -> tuple[CapturedLogits, dict[str, str]]:
        """Read a file written by :meth:`save`; returns ``(captured, header)`` (header values are strings).

        Parameters
        ----------
        path : path-like
        num_experts : int, optional
            Experts per layer of the model (or bank) the logits are for: a capture of another model
            is refused here, naming the file, rather than deep inside a fit or a budget.
        of : str
            What has ``num_experts``, for the message (e.g. ``"--model 'tiny'"``).

        Raises
        ------
        ValueError
            A missing or unreadable file, one that :meth:`save` did not write, one whose layers are
            not ``[tokens, experts]`` with one number of experts (2 or more), or one of another
            number of experts than ``num_experts``.
        """
        from safetensors import safe_open

        path = existing_file("captured logits file", path, missing="run `bh-routing capture` first.")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad files
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({err}); capture again.") from err
        if header.get("format") != CAPTURE_FORMAT:
            raise ValueError(f"{str(path)!r} was not written by bh_helpers (CapturedLogits.save); capture again.")
        # A file edited or damaged after save: say which entry is wrong, never a KeyError
        layer_keys = [k for k in tensors if k.startswith("layer.")]
        missing = [k for k in _ROW_TENSORS if k not in tensors] + ([] if layer_keys else ["layer.<i>"])
        bad = [k for k in layer_keys if not k.split(".", 1)[1].isdigit()]
        total = header.get("total_tokens", "0")
        if missing or bad or not total.isdigit():
            what = (f"lacks {', '.join(missing)}" if missing else f"has unreadable entries {bad}" if bad
                    else f"has total_tokens {total!r}")
            raise ValueError(f"{str(path)!r} {what}: it is damaged or was edited after `bh-routing capture`; "
                             "capture again.")
        logits = {int(k.split(".", 1)[1]): tensors[k] for k in layer_keys}
        rows = {tensors[k].shape[0] for k in _ROW_TENSORS} | {v.shape[0] for v in logits.values()}
        if len(rows) != 1:
            raise ValueError(f"{str(path)!r} holds tensors of different lengths {sorted(rows)}: it is damaged or "
                             "was edited after `bh-routing capture`; capture again.")
        shapes: dict[tuple[int, ...], list[int]] = {}  # shape -> layers; one [N, E] for all is a capture
        for layer in sorted(logits):
            shapes.setdefault(tuple(logits[layer].shape), []).append(layer)
        if len(shapes) != 1 or any(len(shape) != 2 or shape[1] < 2 for shape in shapes):
            found = "; ".join(f"layer{'s' * (len(ls) > 1)} {', '.join(map(str, ls))}: {list(shape)}"
                              for shape, ls in shapes.items())
            raise ValueError(f"{str(path)!r} holds router logits of shapes {found}; a capture holds [tokens, "
                             "experts] with one number of experts (2 or more) in every layer: it is damaged or was "
                             "edited after `bh-routing capture`; capture again.")
        not_float = sorted(layer for layer, x in logits.items() if not x.is_floating_point())
        if not_float:  # save() writes float32; integer logits are an edit that would fit a wrong null quietly
            raise ValueError(f"{str(path)!r} holds router logits of type {logits[not_float[0]].dtype} in layers "
                             f"{not_float}; a capture holds floating-point logits: it is damaged or was edited after "
                             "`bh-routing capture`; capture again.")
        bad_rows = {layer: int((~torch.isfinite(x).all(dim=-1)).sum()) for layer, x in logits.items()}  # (N, E) -> count
        if any(bad_rows.values()):  # nothing can be calibrated on them: say which file, not a fit's argument name
            found = ", ".join(f"layer {layer}: {n}" for layer, n in sorted(bad_rows.items()) if n)
            raise ValueError(f"{str(path)!r} holds tokens with NaN/inf router logits ({found}): the model's router "
                             "overflowed on them or the file was edited; capture again (the demo captures again once "
                             "the file is removed), in float32 if the model ran in float16.")
        huge = {layer: int((x.abs() > LARGEST_LOGIT).sum()) for layer, x in logits.items()}  # (N, E) -> count
        if any(huge.values()):  # no router gives them (the fit's own check names a Python argument)
            found = ", ".join(f"layer {layer}: {n}" for layer, n in sorted(huge.items()) if n)
            raise ValueError(f"{str(path)!r} holds router logits beyond +-{LARGEST_LOGIT:g} ({found}): no router "
                             "gives such a value, so the file is damaged or was edited; capture again.")
        if header.get(CAPTURE_DIGEST) != _capture_digest(tensors, header):  # after the checks that name the damage
            problem = "has no checksum (written by an older bh_helpers, or the field was deleted)" \
                if CAPTURE_DIGEST not in header else "does not match its checksum (a layer, token or header field " \
                "was edited, swapped or removed after `bh-routing capture`)"
            raise ValueError(f"{str(path)!r} {problem}; calibrating on it could be quietly wrong: capture again.")
        experts = next(iter(shapes))[1]
        if num_experts is not None and experts != num_experts:
            raise ValueError(f"{str(path)!r} holds router logits of {experts} experts per layer, but {of} has "
                             f"{num_experts}: capture the calibration logits with that model (`bh-routing capture`).")
        captured = cls(
            logits=logits, token_ids=tensors["token_ids"], positions=tensors["positions"],
            sequence_index=tensors["sequence_index"], total_tokens=int(total),
            router_fingerprint=_header_fingerprint(header, path),
        )
        return captured, header

    def __repr__(self) -> str:
        num_experts = next(iter(self.logits.values())).shape[-1] if self.logits else 0
        return (
            f"CapturedLogits(layers={self.layers}, tokens={self.num_tokens} of {self.total_tokens}, "
            f"experts={num_experts})"
        )


# ----------------------------------------------------------------------------------------------
# Capture
# ----------------------------------------------------------------------------------------------


class _Reservoir:
    """Row store shared by all layers; keeps the ``cap`` rows with the smallest random keys."""

    def __init__(self, layers: list[int], cap: int | None, seed: int) -> None:
        self.cap = cap
        self.generator = torch.Generator().manual_seed(seed)
        self.meta: dict[str, list[torch.Tensor]] = {k: [] for k in ("key", "order", "token", "pos", "seq")}
        self.rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self.size = 0
        self.seen = 0
        self.sequences = 0
        self.current: ForwardInputs | None = None
        self.keep: torch.Tensor | None = None  # rows of the current call that are stored

    def start_call(self, inputs: ForwardInputs) -> None:
        valid = inputs.valid.cpu()  # (B*S,)
        keep = valid.nonzero().squeeze(-1)  # (n,)
        n = keep.numel()
        self.current, self.keep = inputs, keep
        self.meta["key"].append(torch.rand(n, generator=self.generator, dtype=torch.float64))
        self.meta["order"].append(torch.arange(self.seen, self.seen + n))
        self.meta["token"].append(inputs.token_ids.cpu().index_select(0, keep))
        self.meta["pos"].append(inputs.positions.cpu().index_select(0, keep))
        self.meta["seq"].append(inputs.sequence.cpu().index_select(0, keep) + self.sequences)
        self.seen += n
        self.size += n
        self.sequences += int(inputs.sequence.max()) + 1 if inputs.num_rows else 0

    def add(self, layer: int, logits: torch.Tensor) -> None:
        assert self.current is not None and self.keep is not None, "MoE block ran outside a model forward"
        if logits.shape[0] != self.current.num_rows:
            raise RuntimeError(
                f"layer {layer} saw {logits.shape[0]} token rows but the forward call has "
                f"{self.current.num_rows}; capture needs one MoE call per layer per forward."
            )
        self.rows[layer].append(logits.cpu().index_select(0, self.keep))  # (n, E)

    def end_call(self) -> None:
        self.current, self.keep = None, None
        # Amortised pruning: only when the buffer holds more than two caps.
        if self.cap is not None and self.size > 2 * self.cap:
            self.prune()

    def prune(self) -> None:
        meta = {k: torch.cat(v) for k, v in self.meta.items()}
        rows = {layer: torch.cat(v) if v else None for layer, v in self.rows.items()}
        if self.cap is not None and meta["key"].numel() > self.cap:
            # Same keys for every layer, so every layer keeps the same tokens.
            chosen = torch.topk(meta["key"], self.cap, largest=False).indices  # (cap,)
            chosen = chosen.index_select(0, meta["order"].index_select(0, chosen).argsort())  # stream order
            meta = {k: v.index_select(0, chosen) for k, v in meta.items()}
            rows = {layer: r.index_select(0, chosen) if r is not None else None for layer, r in rows.items()}
        self.meta = {k: [v] for k, v in meta.items()}
        self.rows = {layer: [r] if r is not None else [] for layer, r in rows.items()}
        self.size = meta["key"].numel()

    def result(self) -> CapturedLogits:
        self.prune()
        meta = {k: v[0] if v else torch.empty(0, dtype=torch.long) for k, v in self.meta.items()}
        logits = {layer: v[0] for layer, v in self.rows.items() if v}
        return CapturedLogits(
            logits=logits,
            token_ids=meta["token"].long(),
            positions=meta["pos"].long(),
            sequence_index=meta["seq"].long(),
            total_tokens=self.seen,
        )


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def capture_router_logits(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    layers: LayerSpec = None,
    max_tokens_per_layer: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> CapturedLogits:
    """Run ``model`` over ``batches`` and log float32 router logits of every MoE layer.

    Parameters
    ----------
    model : nn.Module
        A causal LM of a supported family (see :mod:`bh_helpers.models.families`).
    batches : iterable of mappings
        Tokenizer outputs (or dicts) with ``input_ids`` ``[B, S]`` and optionally
        ``attention_mask`` ``[B, S]``; other keys are ignored. Moved to the model's device.
    layers : None, int, list of int, or callable, optional
        MoE layers to capture (default: all).
    max_tokens_per_layer : int, optional
        Keep at most this many tokens (the same uniformly drawn subset in every layer).
        None keeps all non-padding tokens.
    seed : int, default 0
        Seed of the subsampling.
    progress : bool, default True
        Show a tqdm progress bar over batches.

    Returns
    -------
    CapturedLogits
        ``{layer: Tensor[N, E]}`` with aligned ``token_ids``, ``positions`` and
        ``sequence_index``; rows in stream order.

    Raises
    ------
    ValueError
        For an unsupported model, a bad ``layers`` or ``max_tokens_per_layer``, or a batch
        without ``input_ids``.

    Examples
    --------
    >>> captured = capture_router_logits(model, [tok(["some text"], return_tensors="pt")])  # doctest: +SKIP
    >>> captured[0].shape  # doctest: +SKIP
    torch.Size([3, 64])
    """
    # Input validation
    if max_tokens_per_layer is not None:
        check_int("max_tokens_per_layer", max_tokens_per_layer, 1)  # or None: keep every token
    blocks = select_layers(find_moe_blocks(model), layers)
    from tqdm.auto import tqdm  # only where used

    reservoir = _Reservoir([b.layer for b in blocks], max_tokens_per_layer, seed)
    device = _model_device(model)

    def on_model_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = forward_inputs(reservoir.seen, args, kwargs)
        if inputs is None:
            raise ValueError("capture_router_logits needs `input_ids` or `inputs_embeds` in the forward call.")
        reservoir.start_call(inputs)

    def block_hook(layer: int):
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, S, H)
            reservoir.add(layer, router_logits(block, hidden))  # (B*S, E)

        return hook

    # Only the router logits are wanted: where the model supports it, compute the output head for
    # the last position alone (not [B, S, V] logits, 206 MiB in float16 at 8 x 256 for OLMoE).
    head_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    handles = []
    try:
        handles.append(model.register_forward_pre_hook(on_model_forward, with_kwargs=True))
        for b in blocks:
            handles.append(b.module.register_forward_pre_hook(block_hook(b.layer), with_kwargs=True))
        total = len(batches) if hasattr(batches, "__len__") else None
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc="capture router logits", disable=not progress):
                if "input_ids" not in batch:
                    raise ValueError("every batch needs `input_ids` (a tokenizer output or a dict).")
                input_ids = batch["input_ids"].to(device)  # (B, S)
                mask = batch.get("attention_mask")
                mask = mask.to(device) if mask is not None else None  # (B, S)
                model(input_ids=input_ids, attention_mask=mask, use_cache=False, **head_kwargs)
                reservoir.end_call()
    finally:
        for handle in handles:
            handle.remove()
    captured = reservoir.result()
    captured.router_fingerprint = router_fingerprint(model, layers=captured.layers) or None  # {} when offloaded
    return captured


# ----------------------------------------------------------------------------------------------
# The calibration capture: the one protocol of the CLI, the demo, the notebooks and benchmarks
# ----------------------------------------------------------------------------------------------


def window_batches(ids: list[int], *, window: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Cut one token stream into rows of ``window`` tokens, ``batch_size`` rows per batch.

    The last row may be shorter; it is right-padded with id 0 and masked out.

    Returns
    -------
    list of dict
        ``input_ids`` and ``attention_mask``, each ``[B, window]`` (the last batch may be narrower).
    """
    window, batch_size = check_int("window", window, 1), check_int("batch_size", batch_size, 1)
    rows = [ids[i: i + window] for i in range(0, len(ids), window)]
    batches = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s: s + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        for i, r in enumerate(chunk):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


def capture_calibration(model: nn.Module, tokenizer: Any, *, max_tokens: int = 4096, window: int = 256,
                        batch_size: int = 8, text_file: str | os.PathLike | None = None,
                        out_path: str | os.PathLike | None = None, model_id: str = "tiny",
                        progress: bool = True) -> CapturedLogits:
    """Capture router logits on calibration text, the way every null bank of the project is fitted.

    The calibration stream (:func:`bh_helpers.models.texts.calibration_token_ids`: documents
    joined by EOS) is cut into windows of ``window`` tokens, ``batch_size`` windows per forward
    pass. The CLI (``capture``, ``demo``), the notebooks and the benchmarks all call this, so
    every bank is fitted on the same kind of input.

    Parameters
    ----------
    model, tokenizer
        A causal LM of a supported family and its tokenizer.
    max_tokens : int, default 4096
        Calibration tokens (half prose, half code from the embedded slice, or the first
        ``max_tokens`` of ``text_file``).
    window : int, default 256
        Tokens per sequence.
    batch_size : int, default 8
        Sequences per forward pass (results do not depend on it).
    text_file : path-like, optional
        Calibrate on this UTF-8 text instead of the embedded calibration slice.
    out_path : path-like, optional
        Save the result there with :meth:`CapturedLogits.save` (with the model id, where the
        text came from, and the router fingerprint in the header).
    model_id : str
        Recorded in the file's metadata.
    progress : bool

    Returns
    -------
    CapturedLogits
    """
    check_capture(max_tokens=max_tokens, window=window, batch_size=batch_size, out_path=out_path, text_file=text_file)
    check_window_fits(model, window)
    ids = calibration_token_ids(tokenizer, max_tokens=max_tokens, text_file=text_file)
    if len(ids) < MIN_CALIBRATION_TOKENS:
        raise ValueError(f"the calibration text has fewer than {MIN_CALIBRATION_TOKENS} tokens; give it more text.")
    if len(ids) < max_tokens:  # not a quiet cap: the null and every alpha are calibrated on what was captured
        warnings.warn(f"the calibration text holds {len(ids):,} tokens, fewer than the {max_tokens:,} of `max_tokens`: "
                      f"all {len(ids):,} are captured (pass a longer `text_file` for more).", stacklevel=2)
    with contextlib.ExitStack() as stack:
        if out_path is not None:  # one writer: a second capture into the same file is refused at once
            stack.enter_context(new_output(out_path, "`out_path`"))
        captured = capture_router_logits(model, window_batches(ids, window=window, batch_size=batch_size),
                                         progress=progress)
        if out_path is not None:
            source = str(text_file) if text_file is not None else "embedded corpus, calibration slice (half prose, half code)"
            captured.save(out_path, metadata={
                "model_id": model_id, "calibration": f"{source}, {len(ids)} tokens, windows of {window}",
                "max_tokens": max_tokens, "window": window})
    return captured


def check_capture(*, max_tokens: int, window: int, batch_size: int, out_path: str | os.PathLike | None = None,
                  text_file: str | os.PathLike | None = None) -> None:
    """The options of :func:`capture_calibration`, checked before a model is needed.

    The one check of the capture options: ``capture_calibration`` runs it first, and the command
    line runs it before loading the model, so a bad value writes nothing. ``out_path`` must not
    exist (captures are never overwritten; checked again under the lock); ``text_file`` must be
    UTF-8 text.
    """
    check_int("max_tokens", max_tokens, MIN_CALIBRATION_TOKENS)
    check_int("window", window, 1)
    check_int("batch_size", batch_size, 1)
    if out_path is not None:
        refuse_existing(out_path, "`out_path`")
    if text_file is not None:
        read_text_file(text_file)


def split_by_sequence(captured: CapturedLogits, *, held_out_fraction: float = 0.25,
                      seed: int = 0) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Split captured logits by SEQUENCE (all tokens of a window on one side).

    Tokens of one sequence are correlated, so a split by token would make held-out logits look
    better fitted than they are.

    Returns
    -------
    fit, held_out : dict of int to Tensor ``[n, E]``
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"`held_out_fraction` must be in (0, 1); got {held_out_fraction}.")
    sequences = torch.unique(captured.sequence_index)
    g = torch.Generator().manual_seed(seed)
    shuffled = sequences[torch.randperm(sequences.numel(), generator=g)]
    n_held = max(1, int(round(held_out_fraction * sequences.numel())))
    if n_held >= sequences.numel():
        raise ValueError("need at least two captured sequences to hold some out.")
    held = torch.isin(captured.sequence_index, shuffled[:n_held])  # (N,)
    fit = {layer: captured[layer][~held] for layer in captured}
    held_out = {layer: captured[layer][held] for layer in captured}
    return fit, held_out
