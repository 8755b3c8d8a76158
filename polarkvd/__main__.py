"""`python -m polarkvd` is the `polarkvd` command."""

from polarkvd.cli import main

raise SystemExit(main())
