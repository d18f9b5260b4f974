"""The I/O shell's network endpoints: UDP gossip and the peer HTTP (TCP) side of the bind port."""
