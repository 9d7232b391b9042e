"""The command line: parse, call the core, render. Nothing here is imported by the core."""

import time

# The earliest moment vlmduo's own code runs in a CLI process (vlmduo/__init__.py holds only
# the version): where the process clock starts when the OS cannot say when the process did.
STARTED = time.perf_counter()
