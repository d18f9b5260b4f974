"""Update distribution: chunker, signed manifests, chunk store, activation, peer transfer.

The decisions are sans-IO and live in meshd.core: which release to adopt (core/adoption.py) and
which chunk to fetch from whom (core/swarm.py). service.py wires the rest (see its docstring).
"""
