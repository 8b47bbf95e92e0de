"""`python -m bloodcell ...` is the `bloodcell` command."""

from .cli import app

if __name__ == "__main__":
    app(prog_name="bloodcell")
