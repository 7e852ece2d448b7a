"""`python -m train CONFIG [overrides]`: the training job's entrypoint (what `ray job submit` and
`moray train --address` run on the cluster). Joins the cluster it runs in, or starts a local one."""

from __future__ import annotations

import sys

from cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
