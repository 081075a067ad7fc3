"""flux-sharded: run FLUX text-to-image in three memory-budgeted stages across small GPUs.

The Python API (api.py) is reached from here: `flux_sharded.open_model(...)`, `flux_sharded.Model`.
"""

__version__ = "0.1.0"

# The API imports torch and diffusers (seconds): loaded when first named, so that the command line,
# which imports this package for its version, refuses a typo before that.
API_NAMES = ("open_model", "Model", "Plan", "Generation")


def __getattr__(name: str):
    if name in API_NAMES:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'flux_sharded' has no attribute '{name}'")
