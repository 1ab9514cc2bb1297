"""``python -m paretomerge ...`` (what ``torchrun -m paretomerge`` runs on every rank): the CLI."""
import sys

from .cli import main

sys.exit(main())
