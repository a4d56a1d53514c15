"""Imported as the preload module of multiprocessing's forkserver (:func:`sealer.worker_pool`
with ``clean``): the forkserver then dies with the thread of the vault process that started
it, and its workers (which die with the forkserver) with it, also after ``kill -9``.

Without it the forkserver outlives a killed parent for good: every worker it forks holds the
write end of the forkserver's "alive" pipe, so the pipe never reaches EOF, and the workers
wait for jobs from a parent that is gone.
"""

import os

from .sealer import _set_pdeathsig

_set_pdeathsig()

#: the forkserver's pid: its workers (forked from it, so they share this module) check that
#: they are still its children once their own death signal is armed
server = os.getpid()
