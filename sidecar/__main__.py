"""`python -m sidecar` is the `tether` command."""

from sidecar.cli import main

raise SystemExit(main())
