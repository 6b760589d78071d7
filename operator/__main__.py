"""`python -m tokenmill.operator`: run the operator (the same as `tokenmill operator`)."""

import sys

from tokenmill.operator.cli import main

sys.exit(main())
