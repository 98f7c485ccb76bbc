import sys

from cmkg.cli import main

sys.exit(main())
