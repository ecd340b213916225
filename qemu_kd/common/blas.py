"""numpy without BLAS worker threads, for processes that start side by side.

Importing numpy loads its BLAS library (OpenBLAS), which starts one worker
thread per CPU and lets them spin for a while before they sleep.  qemu-kd does
no linear algebra, so those threads only burn CPU: on a machine with 2 CPUs,
where the platform daemon, the host VMM and the CLI start at the same time,
they cost each process about 0.05-0.1 CPU-seconds that the others were waiting
for.  :func:`single_threaded_blas`, called before numpy's first import, keeps
BLAS to the calling thread.  A variable the user set is left as it is.
"""

from __future__ import annotations

import os
from typing import MutableMapping

#: The environment variables BLAS libraries read their thread count from.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS",)


def single_threaded_blas(environ: MutableMapping[str, str] = os.environ) -> None:
    """Make BLAS single-threaded unless the environment says otherwise.

    Must run before numpy is first imported in this process (it is read once,
    at that import); children started afterwards inherit the setting."""
    for name in BLAS_THREAD_VARIABLES:
        environ.setdefault(name, "1")
