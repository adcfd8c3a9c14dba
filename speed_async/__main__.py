import sys

from speed_async.cli import main

sys.exit(main())
