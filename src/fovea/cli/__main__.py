"""``python -m fovea.cli``: the same as the ``fovea`` console script."""

from fovea.cli import main

main()
