"""Using a trained Memory Decoder: mixing, per-token scoring, the router, fast (compiled/graphed) paths and
the joint model `MemoryDecoder`."""
