import sys

from moecpt.cli import main

sys.exit(main())
