"""``python -m rollnet``: the command line (so ``torchrun -m rollnet train CONFIG`` works)."""

from rollnet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
