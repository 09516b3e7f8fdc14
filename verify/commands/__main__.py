"""``python -m verify.commands``: the ``attnverify`` command."""

import sys

from verify.commands import main

sys.exit(main())
