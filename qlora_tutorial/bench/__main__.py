"""``python -m qlora_tutorial.bench``: see ``cli``."""
import sys

from .cli import main

sys.exit(main())
