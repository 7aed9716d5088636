"""Tests of the reference trainer (rcl_ops.train), one file per concern; trainer-only helpers in helpers.py."""
