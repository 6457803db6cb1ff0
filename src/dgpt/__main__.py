import sys

from dgpt.cli import main

sys.exit(main())
