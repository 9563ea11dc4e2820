"""``python -m diffsamp.cli`` runs the command line."""

from diffsamp.cli import main

main()
