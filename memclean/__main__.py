import sys

from memclean.cli import main

sys.exit(main())
