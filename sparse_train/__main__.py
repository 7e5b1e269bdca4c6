"""`python -m sparse_train` is the `sparse-train` command."""

from sparse_train.cli import entry

entry()
