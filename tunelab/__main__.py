# Entry point for `python -m tunelab` and `torchrun ... -m tunelab`.
from tunelab.commands.cli import main

if __name__ == "__main__":
    main()
