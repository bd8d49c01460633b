"""``python -m ringsim.conform MODULE:FUNCTION ...``: ``ringsim conform`` as a module, for
the ranks of a ring (``mpiexec -n P python -m mpi4py -m ringsim.conform ... --kind shard``,
``torchrun --nproc-per-node P -m ringsim.conform ...``). See :mod:`ringsim.cli.conform`."""

from ringsim.cli.conform import main

if __name__ == "__main__":
    main()
