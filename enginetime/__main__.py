import sys

from enginetime.cli import main

sys.exit(main())
