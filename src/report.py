"""`python -m report <sweep dir or runs dir>`: aggregate results.json files into tables and plots."""

import sys

from lorabench.report import main

if __name__ == "__main__":
    sys.exit(main())
