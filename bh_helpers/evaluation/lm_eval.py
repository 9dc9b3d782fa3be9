"""Hand a model routed by :func:`bh_helpers.routing.patch.route` to lm-evaluation-harness.

Optional: needs the ``lmeval`` extra (``pip install bh-routing[lmeval]``, i.e.
``lm-eval>=0.4.5,<0.5``); ``lm_eval`` is imported only when a function here is called.

Routing is installed on the model's MoE block INSTANCES, so lm-eval's ``HFLM`` wrapper
(``HFLM(pretrained=model, tokenizer=tokenizer)``) sees it without knowing: every forward pass
it makes inside ``with route(model, selector)`` is routed. :func:`evaluate_routed` does exactly
that around ``lm_eval.simple_evaluate`` and adds the recorder's summary (experts per token) to
lm-eval's results.

Local tasks live in :func:`local_task_dir` (``bh_helpers/data/lm_eval_tasks/``):
``bh_hellaswag_style`` is lm-eval's own ``hellaswag`` task (same ``process_docs``, prompt,
``" "`` target delimiter, ``acc``/``acc_norm``) over the committed fixture
``bh_helpers/data/fixtures/hellaswag_style.jsonl``, so its ``acc`` equals
:func:`bh_helpers.evaluation.tasks.multiple_choice_accuracy` on ``load_hellaswag(path=fixture)``.
Their ``data_files`` are written relative to the YAML's folder, but lm-eval passes
``dataset_kwargs`` unchanged to ``datasets.load_dataset``, which resolves relative paths
against the current working directory. :func:`resolved_task_dir` therefore writes, for each
local YAML, a small YAML that ``include``\\ s the original (so ``!function`` still resolves next
to it) and overrides ``dataset_kwargs`` with absolute paths; :func:`evaluate_routed` uses it.

Examples
--------
>>> from bh_helpers.evaluation.lm_eval import evaluate_routed
>>> from bh_helpers.selection.selectors import TopKSelector
>>> out = evaluate_routed(model, tok, TopKSelector(4), ["bh_hellaswag_style"], limit=20)  # doctest: +SKIP
>>> out["results"]["bh_hellaswag_style"]["acc,none"], out["routing"]["mean_k"]  # doctest: +SKIP
(0.45, 4.0)
"""

from __future__ import annotations

import importlib.resources
import inspect
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bh_helpers._validate import check_int
from bh_helpers.routing.patch import route

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "INSTALL_HINT",
    "LOCAL_TASKS",
    "evaluate_routed",
    "local_task_dir",
    "make_lm",
    "resolved_task_dir",
]

#: How to get the optional dependency (named in the ImportError).
INSTALL_HINT = "pip install bh-routing[lmeval]"
#: Tasks defined in :func:`local_task_dir`.
LOCAL_TASKS = ("bh_hellaswag_style",)
#: Requests per forward pass handed to ``HFLM``.
DEFAULT_BATCH_SIZE = 8

_TASK_DIR = Path(str(importlib.resources.files("bh_helpers") / "data" / "lm_eval_tasks"))


def _require_lm_eval():
    """Import ``lm_eval`` (and its HF backend) or raise an ImportError naming the extra."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (checks the HF backend imports)
    except ImportError as err:
        raise ImportError(
            "bh_helpers.evaluation.lm_eval needs lm-evaluation-harness, an optional dependency: "
            f"`{INSTALL_HINT}` (or `pip install 'lm-eval>=0.4.5,<0.5'`). Import failed with: {err}"
        ) from err
    return lm_eval


# ----------------------------------------------------------------------------------------------
# Local tasks
# ----------------------------------------------------------------------------------------------


def local_task_dir() -> Path:
    """The committed folder of local lm-eval task YAMLs (``bh_helpers/data/lm_eval_tasks``)."""
    return _TASK_DIR


class _TagKeepingLoader(yaml.SafeLoader):
    """SafeLoader that reads lm-eval's ``!function`` tags as plain strings (nothing is imported)."""


_TagKeepingLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _absolute(value: Any, base: Path) -> Any:
    """``data_files`` (str, list of str, or dict of those) with relative paths made absolute."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())
    if isinstance(value, Mapping):
        return {split: _absolute(v, base) for split, v in value.items()}
    if isinstance(value, Sequence):
        return [_absolute(v, base) for v in value]
    raise ValueError(f"`data_files` entries must be str, list or dict; got {value!r}.")


def resolved_task_dir(dest: str | os.PathLike) -> Path:
    """Write, into ``dest``, lm-eval YAMLs for the local tasks with absolute data paths.

    Each written YAML has ``include: <absolute path of the committed YAML>``, the same ``task``
    name and ``dataset_kwargs`` whose ``data_files`` (and ``data_dir``) are absolute. lm-eval
    loads an included YAML from its own folder, so ``!function utils....`` still resolves next
    to the committed file.

    Parameters
    ----------
    dest : path
        An existing folder (e.g. a ``tempfile.TemporaryDirectory``); pass it to lm-eval as
        ``include_path``.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    FileNotFoundError
        When ``dest`` is not a folder, or a resolved data file does not exist.
    """
    dest = Path(dest)
    if not dest.is_dir():
        raise FileNotFoundError(f"`dest`={str(dest)!r} is not an existing folder.")
    for source in sorted(local_task_dir().glob("*.yaml")):
        with source.open("rb") as fh:
            config = yaml.load(fh, Loader=_TagKeepingLoader)  # noqa: S506 (SafeLoader subclass)
        kwargs = dict(config.get("dataset_kwargs") or {})
        for key in ("data_files", "data_dir"):
            if key in kwargs:
                kwargs[key] = _absolute(kwargs[key], source.parent)
        for path in _flat_paths(kwargs.get("data_files")):
            if not Path(path).is_file():
                raise FileNotFoundError(f"task {config['task']!r}: data file {path} is missing.")
        override = {"include": str(source), "task": config["task"], "dataset_kwargs": kwargs}
        (dest / source.name).write_text(yaml.safe_dump(override, sort_keys=False), encoding="utf-8")
    return dest


def _flat_paths(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [p for v in value.values() for p in _flat_paths(v)]
    return [p for v in value for p in _flat_paths(v)]


# ----------------------------------------------------------------------------------------------
# Model wrapper and evaluation
# ----------------------------------------------------------------------------------------------


def make_lm(model, tokenizer, *, batch_size: int = DEFAULT_BATCH_SIZE, **hflm_kwargs):
    """Wrap a (possibly routed) transformers causal LM as lm-eval's ``HFLM``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Used as is (device, dtype); routing installed with ``route`` applies to every forward
        pass the wrapper makes while the context is open, whether the wrapper was built inside
        or outside it.
    tokenizer : transformers tokenizer
        The model's tokenizer (instance, not a name: nothing is downloaded).
    batch_size : int, default 8
        Requests per forward pass.
    **hflm_kwargs
        Passed to ``HFLM`` (e.g. ``max_length``, ``add_bos_token``).

    Returns
    -------
    lm_eval.models.huggingface.HFLM
        It puts ``model`` in eval mode and sets a pad token on ``tokenizer`` when it has none.

    Raises
    ------
    ImportError
        Without the ``lmeval`` extra.
    ValueError
        For a ``batch_size`` that is not a positive int.
    """
    check_int("batch_size", batch_size, 1)
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **hflm_kwargs)


def _task_manager(include_path: list[str], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    kwargs: dict[str, Any] = {"include_path": include_path}
    if "include_defaults" in inspect.signature(TaskManager).parameters:
        kwargs["include_defaults"] = include_defaults
    return TaskManager(**kwargs)


def evaluate_routed(
    model,
    tokenizer,
    selector,
    tasks: str | Iterable[str],
    *,
    limit: int | float | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mode: str = "patch",
    layers=None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    hflm_kwargs: Mapping[str, Any] | None = None,
    **simple_evaluate_kwargs,
) -> dict:
    """Run lm-eval tasks on ``model`` routed by ``selector``; add the routing summary.

    Parameters
    ----------
    model, tokenizer
        As for :func:`make_lm`.
    selector : Selector or None
        Passed to :func:`bh_helpers.routing.patch.route`; ``None`` evaluates the model untouched
        (the baseline) and sets ``"routing"`` to None.
    tasks : str or iterable of str
        lm-eval task names: the local ones (:data:`LOCAL_TASKS`), lm-eval's built-in ones, or
        ones found under ``include_path``.
    limit : int or float, optional
        At most this many documents per task (a float in (0, 1): that fraction); lm-eval takes
        the first ones in order.
    include_path : path or list of paths, optional
        More task folders, searched after the local tasks.
    include_defaults : bool, optional
        Index lm-eval's built-in tasks (a few seconds). Default: only when a task is not local.
        Ignored by lm-eval versions without the option (they always index them).
    batch_size : int, default 8
    mode : {"patch", "analyze"}, default "patch"
        Passed to ``route``.
    layers : optional
        MoE layers to route, passed to ``route`` (default all).
    num_fewshot : int, optional
    log_samples : bool, default False
        Keep per-document requests and responses under ``"samples"``.
    hflm_kwargs : mapping, optional
        More keyword arguments of ``HFLM``.
    **simple_evaluate_kwargs
        Passed to ``lm_eval.simple_evaluate`` (e.g. ``bootstrap_iters``, ``random_seed``).

    Returns
    -------
    dict
        lm-eval's result dict (``"results"``: ``{task: {"acc,none": ..., ...}}``, ``"configs"``,
        ``"n-samples"``, ``"samples"`` when logged, ...) plus ``"routing"``: the recorder's
        :meth:`~bh_helpers.routing.recorder.RoutingRecorder.summary` (``mean_k`` = mean experts per
        token over all routed layers and tokens, padding included: lm-eval forwards right-padded
        batches without an attention mask), or None when ``selector`` is None.

    Raises
    ------
    ImportError
        Without the ``lmeval`` extra.
    ValueError
        For an empty ``tasks``.
    """
    lm_eval = _require_lm_eval()
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError("`tasks` is empty; pass at least one lm-eval task name.")
    extra = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    )
    if include_defaults is None:
        include_defaults = not set(names) <= set(LOCAL_TASKS)
    with tempfile.TemporaryDirectory(prefix="bh_lm_eval_tasks_") as tmp:
        paths = [str(resolved_task_dir(tmp))] + [str(Path(p)) for p in extra]
        task_manager = _task_manager(paths, include_defaults)

        def run() -> dict:
            lm = make_lm(model, tokenizer, batch_size=batch_size, **dict(hflm_kwargs or {}))
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=log_samples,
                task_manager=task_manager,
                **simple_evaluate_kwargs,
            )

        if selector is None:
            results, summary = run(), None
        else:
            with route(model, selector, mode=mode, layers=layers) as rec:
                results = run()
            summary = rec.summary()
    if results is None:  # non-zero rank of a distributed run
        return {"routing": summary}
    return {**results, "routing": summary}
