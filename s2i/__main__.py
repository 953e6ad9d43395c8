import sys

from s2i.cli import main

sys.exit(main())
