"""`python -m compress ...`, and under torchrun `torchrun --nproc-per-node N -m compress ...`: the `compress` command."""
import sys

from compress.cli import main

sys.exit(main())
