import sys

from unsloth_ext.cli import main

sys.exit(main())
