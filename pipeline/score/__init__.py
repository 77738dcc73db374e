"""The score layer: V(x) and log p(x) of images under a diffusion model.

schedules (VP/VE noise schedules), models (checkpoints through diffusers' loaders, the score
function), probes (Hutchinson probes), volume (the ODE solve), scoring (a stream of images ->
score rows), cache (scores by content, model and settings). Imports nothing from decide/, run/
or io/ outputs: scoring reads images through io.data only.
"""
