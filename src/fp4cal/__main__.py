import sys

from fp4cal.cli import main

sys.exit(main())
