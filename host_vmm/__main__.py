import logging
import os
import sys

from .service import main

code = main()
# main has closed its socket and destroyed (or detached) its domain: the interpreter's teardown
# (unloading numpy, cryptography and the rest) would only delay the process that waits for this one.
logging.shutdown()
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except (OSError, ValueError):
        pass
os._exit(code)
