"""The harness of the torch backend, apart from the library: the device check
(:mod:`.check`), the benchmarks (:mod:`.bench`, :mod:`.bench_backward`, :mod:`.bench_ring`),
the multi-process parity check (:mod:`.distcheck`), the profile and the timing helpers. Each
command runs as ``python -m ringsim.gpu.harness.<name>``; nothing in the library imports it.
"""
