"""Benchmarks of rcl_ops against the alternatives a user would pick (run: python -m benchmarks.run)."""
