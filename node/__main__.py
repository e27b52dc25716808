"""``python -m node`` is the same as the ``synthnode`` command."""

from node.cli import main

raise SystemExit(main())
