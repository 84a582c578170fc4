"""A checkpoint on disk and resuming from it: finding the newest readable one (``find``), writing it atomically with
checksums (``files``), reading it without running code (``safe_load``), checking what may change on resume
(``resume``, ``identity``) and re-partitioning ZeRO state for another number of ranks (``reshard``)."""
