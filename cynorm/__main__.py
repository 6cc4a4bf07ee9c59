"""`python -m cynorm`: self-check; `python -m cynorm bench`: benchmark (see cynorm._bench)."""
import sys

from cynorm._bench import main

sys.exit(main())
