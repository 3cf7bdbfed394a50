"""``python -m data.synthetic``: see :mod:`data.synthetic.cli`."""
import sys

from data.synthetic.cli import main

sys.exit(main())
