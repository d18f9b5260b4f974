"""Update distribution: chunker, signed manifests, chunk store, activation.

The fetch scheduler itself is sans-IO and lives in meshd.core.swarm; the peer HTTP transfer and
the daemon wiring use these modules.
"""
