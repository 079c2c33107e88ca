import sys

from flatopt.cli import main

sys.exit(main())
