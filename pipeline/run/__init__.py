"""The run layer: the settings of a run (one model, from which the CLI and the flow are derived),
the resources a process shares (loaded models, score caches), sharded scoring and the run's
lifecycle (start, score, decide, write, commit). The CLI (memclean/) and flows/ sit on top.
"""
