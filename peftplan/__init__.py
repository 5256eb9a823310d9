"""peftplan: will this fine-tuning run fit on my GPU, how long will it take, which method should I use?

The core (`estimate`, the catalogs, the methods) is pure Python: it imports neither torch nor pandas.
"""

__version__ = "0.1.0"

__all__ = ["envelope", "EnvelopeError"]


def __getattr__(name: str):  # lazy: `import peftplan` stays light (the CLI's fast path)
    if name in ("envelope", "EnvelopeError", "EnvelopeMeasurement"):
        import importlib

        module = importlib.import_module(".envelope", __name__)  # binds peftplan.envelope to the (callable) module
        return module if name == "envelope" else getattr(module, name)
    raise AttributeError(f"module 'peftplan' has no attribute {name!r}")
