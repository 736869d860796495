"""``python -m exits.cli``: the same as the ``exits`` console command."""
from exits.cli.commands import main

main()
