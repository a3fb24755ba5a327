"""`python -m suite ...`: the command line without installing the package (e.g. `PYTHONPATH=.`)."""
import sys

from suite.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
