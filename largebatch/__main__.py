"""``python -m largebatch``: the command line."""

from largebatch.cli import main

if __name__ == "__main__":
    main()
