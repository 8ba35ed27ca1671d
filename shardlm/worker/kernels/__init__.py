"""Home of shardlm's own GPU kernels (Triton). Each kernel keeps a torch reference with the same
signature; shardlm.worker.layers calls them by name. None has landed yet: the layers run torch ops."""
