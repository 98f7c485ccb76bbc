from cmkg.cli import main
import sys
sys.exit(main())
