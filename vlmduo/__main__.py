"""``python -m vlmduo`` runs the CLI."""

from vlmduo.cli.app import main

main()
