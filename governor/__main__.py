"""`python -m governor` is the same as the `governor` console script."""

from governor.cli import main

raise SystemExit(main())
