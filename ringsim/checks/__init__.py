"""Checks launched under mpiexec; each prints one line from rank 0."""
