"""`python -m stablenet` runs the CLI."""

from stablenet.cli import main

raise SystemExit(main())
