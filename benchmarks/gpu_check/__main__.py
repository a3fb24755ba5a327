"""`python -m benchmarks.gpu_check`: see `benchmarks.gpu_check.cli`."""
import sys

from benchmarks.gpu_check.cli import main

sys.exit(main())
