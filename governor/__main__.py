"""`python -m governor` is the same as the `governor` console script."""

from governor.cli.main import main

raise SystemExit(main())
