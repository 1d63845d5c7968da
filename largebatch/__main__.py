"""``python -m largebatch`` (also what torchrun launches)."""

from largebatch.cli import main

if __name__ == "__main__":
    main()
