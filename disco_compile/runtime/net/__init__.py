"""The runtime over a network: ZeroMQ transport with CURVE keys, peers, and serving nodes as processes."""
