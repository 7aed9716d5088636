"""``python -m rcl_ops.train``: the same as the ``rcl-train`` command."""

from .cli import main

raise SystemExit(main())
