"""``python -m tools`` runs walctl (same as the ``walctl`` console script)."""

from .walctl import cli

if __name__ == "__main__":
    cli(prog_name="walctl")
