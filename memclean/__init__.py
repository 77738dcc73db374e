"""The `memclean` command line, on top of the pipeline library and the Prefect flows."""
