"""`python -m medmvl_cli ...` = `medmvl ...` (what torchrun re-launches)."""

from medmvl_cli.cli.app import main

main()
