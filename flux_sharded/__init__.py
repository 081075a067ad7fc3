"""flux-sharded: run FLUX.1 text-to-image in three memory-budgeted stages across small GPUs."""

__version__ = "0.1.0"
