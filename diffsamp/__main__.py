"""``python -m diffsamp`` runs the command line."""

from diffsamp.cli import main

main()
