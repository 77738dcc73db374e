"""Tools beside the cleaning run: the small DDPM trainer (demo and proxy models) and the
evidence statistics that benchmarks/ uses."""
