"""The `medmvl` command line: one module per command group, joined in app.py."""
