"""``python -m surgery.cli``."""

from . import main

main()
