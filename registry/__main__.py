"""`python -m registry publish RECIPE` (and the other registry commands: promote, rollback, pull, ui, approve)."""
from .cli import main

raise SystemExit(main())
