"""`python -m dkd_cache ...` (and `torchrun -m dkd_cache ...`) runs the command line."""

from .cli import app

if __name__ == "__main__":
    app(prog_name="dkd-cache")
