"""moecpt: continual pre-training of Mixture-of-Experts language models (Mixtral-style).

The top-level names load lazily so that `import moecpt.data` (tokenizer workers, the CLI) does not pay for
importing torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "MixtralConfig": "moecpt.model",
    "MixtralForCausalLM": "moecpt.model",
    "from_pretrained": "moecpt.model",
    "build_model": "moecpt.model",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moecpt' has no attribute {name!r}")
