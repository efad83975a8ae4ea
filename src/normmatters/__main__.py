"""``python -m normmatters``: the same as the ``normmatters`` command."""

from normmatters.experiments.cli import main

raise SystemExit(main())
