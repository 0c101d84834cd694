"""Thin DVC stage entry points: parse the CLI, load params, call into `pipeline`."""
