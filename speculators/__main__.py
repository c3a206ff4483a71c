import sys

from speculators.cli import main

sys.exit(main())
