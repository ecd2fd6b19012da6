"""`python -m gptlab` (what `torchrun -m gptlab` runs)."""

from gptlab.cli import main

main()
