"""``dice-ds bench``: the speed of every parallel mode on emulated links, against the overlap bound.

Modules: ``links`` (network namespaces, veth pair, tbf shaping), ``launch`` (one 2-rank sampling run
or communication probe in those namespaces), ``probe`` (the communication-only measurement),
``report`` (medians, bound, markdown, JSON, plot), ``cli`` (the subcommand). docs/benchmarks.md
explains the method and holds the committed results.
"""
