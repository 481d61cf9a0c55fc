"""``python -m fovea``: the ``fovea`` console script, also what ``torchrun … -m fovea train`` starts."""

from fovea.cli import main

main()
