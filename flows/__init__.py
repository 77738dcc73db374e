"""Prefect flows: thin wrappers that wire pipeline/ calls into tasks."""
