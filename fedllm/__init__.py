"""fedllm: privacy-preserving federated fine-tuning of LLMs.

The Python API (``compose``, ``simulate``, ``sweep``, ``RunResult``, ``ConfigError``) is loaded
on first use, so ``import fedllm`` stays cheap: no torch, Flower or Hydra until a name is used.
"""

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily by __getattr__)
_LAZY = {
    "compose": "fedllm.api",
    "simulate": "fedllm.api",
    "RunResult": "fedllm.api",
    "RunError": "fedllm.api",
    "Config": "fedllm.api",
    "ConfigError": "fedllm.config",
    "sweep": "fedllm.multirun",
    "load_adapter": "fedllm.export",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fedllm' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name])
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
