"""Where the operators run: the pipeline spec, the runner (shards, commits, barriers, resume),
the one Ray Data adapter, and Ray jobs."""
