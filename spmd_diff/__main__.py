import sys

from spmd_diff.cli import main

sys.exit(main())
