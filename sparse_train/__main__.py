"""`python -m sparse_train` is the `sparse-train` command."""

import sys

from sparse_train.cli import main

sys.exit(main())
