"""What users call: the Python `LLM`, the `shardlm` command line, the benchmarks and the probe."""
