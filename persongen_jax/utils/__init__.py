"""Helpers used across the library and the scripts that belong to no one model family or entry point."""
