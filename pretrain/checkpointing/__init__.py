"""A checkpoint on disk and resuming from it: planning a resume (``resume``: the newest usable checkpoint, the
settings a resume may change, the change record), finding and verifying checkpoints (``find``), writing them
atomically with checksums (``files``), reading them without running code (``safe_load``), a run's data and batch
identity (``identity``) and re-partitioning ZeRO state for another number of ranks (``reshard``). Only
``callbacks`` (``RunCheckpoint``, ``AtomicCheckpointIO``, ``ElasticResume``) imports Lightning."""
