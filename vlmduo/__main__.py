"""``python -m vlmduo`` runs the CLI."""

from vlmduo.cli.main import main

main()
