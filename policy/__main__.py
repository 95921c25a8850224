"""``python -m policy`` is the ``mailpolicy`` command."""

from policy.cli import main

raise SystemExit(main())
