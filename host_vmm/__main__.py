from qemu_kd.common.blas import single_threaded_blas

# Before numpy's first import (the service's modules import it): its BLAS worker threads would
# spin on the CPUs the platform daemon and the caller start on.
single_threaded_blas()

from qemu_kd.common.process import exit_without_teardown  # noqa: E402

from .service import main  # noqa: E402

# main has closed its socket and destroyed (or detached) its domain: the interpreter's teardown
# (unloading numpy, cryptography and the rest) would only delay the process that waits for this one.
exit_without_teardown(main())
