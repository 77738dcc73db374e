"""memclean: find and clean the training images a diffusion model reproduces most easily."""

__version__ = "0.1.0"
