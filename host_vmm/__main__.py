from qemu_kd.common.process import exit_without_teardown

from .service import main

# main has closed its socket and destroyed (or detached) its domain: the interpreter's teardown
# (unloading numpy, cryptography and the rest) would only delay the process that waits for this one.
exit_without_teardown(main())
