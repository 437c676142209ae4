import sys

from safetrain.cli import main

sys.exit(main())
