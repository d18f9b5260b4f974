"""The sans-IO core: no sockets, no clocks, no global randomness. Time and an RNG are passed in."""
