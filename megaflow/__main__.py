import sys

from megaflow.cli import main

if __name__ == "__main__":  # dist_checkpointing starts a spawn Manager: the guard is required
    sys.exit(main())
