"""`python -m compress ...`, and under torchrun `torchrun --nproc-per-node N -m compress ...`: the command."""
import sys

from compress.cli import main

sys.exit(main())
