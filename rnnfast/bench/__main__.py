"""``python -m rnnfast.bench``: the ``rnnfast-bench`` command."""

from .cli import main

raise SystemExit(main())
