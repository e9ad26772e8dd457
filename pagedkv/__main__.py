"""`python -m pagedkv`: the `pagedkv` command."""
import sys

from pagedkv.runtime.cli.main import main

sys.exit(main())
