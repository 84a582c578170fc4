"""What the reliability checks cost, in seconds per GB and minutes per TB, on this machine.

    python bench/recovery_checks.py [--gb 1] [--dir /tmp] [--shards DIR]

Measures, on a checkpoint-like file of ``--gb`` GB of fp32 tensors written into ``--dir``:

- the atomic checkpoint write (temp file beside the target, sha256 while writing, fsync, rename, checksum file),
  against a plain ``torch.save`` to the same directory;
- the sha256 verification on resume (``checksum_problem``: one sequential read) and the restricted read of the
  checkpoint's pickle (``safe_load``, memory-mapped: the tensor bytes are not read);
- the shard sha256 (``data_prep.shard_format.file_sha256``, what the background check and ``data_prep inspect``
  compute per shard), on the same file;
- with ``--shards DIR``: the start-up check of that shard set (``data.verify=fast``: manifest, headers, sizes,
  tokenizer copy), per shard.

Reads come from the page cache (the file was just written), so they measure the hashing itself, which is what
bounds the checks on fast storage; ``--cold`` (root only) drops the whole machine's page cache before each read
to measure the disk instead (do not use it on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (default 1)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write it (default $TMPDIR or /tmp)")
    parser.add_argument("--shards", help="a shard directory whose start-up check to time")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each read (root)")
    args = parser.parse_args()

    from data_prep import shard_format as sf
    from pretrain.checkpointing import safe_load
    from pretrain.checkpointing.files import checksum_path, checksum_problem, save_atomic

    n = int(args.gb * 1e9 / 4)
    state = {"state_dict": {f"w{i}": torch.randn(n // 8) for i in range(8)}, "global_step": 1}
    directory = Path(tempfile.mkdtemp(prefix="recovery-checks-", dir=args.dir))
    target, plain = directory / "last.ckpt", directory / "plain.ckpt"
    try:
        t_plain = timed(lambda: torch.save(state, plain))
        t_atomic = timed(lambda: save_atomic(state, target))
        size_gb = target.stat().st_size / 1e9
        del state
        cold = args.cold and drop_caches()
        t_verify = timed(lambda: checksum_problem(target))
        args.cold and drop_caches()
        t_read = timed(lambda: safe_load.load(target))
        args.cold and drop_caches()
        t_shard = timed(lambda: sf.file_sha256(target))
        per_tb = lambda seconds: seconds / size_gb * 1000 / 60  # noqa: E731  minutes per TB
        reads = "from disk (page cache dropped)" if cold else "from the page cache"
        print(f"checkpoint {size_gb:.2f} GB in {directory.parent}; reads {reads}")
        print(f"  plain torch.save                         {t_plain:7.2f} s")
        print(f"  atomic write (+sha256, fsync, rename)    {t_atomic:7.2f} s")
        print(f"  sha256 verification on resume           {t_verify:7.2f} s  = {t_verify / size_gb:.2f} s/GB, "
              f"{per_tb(t_verify):.0f} min/TB")
        print(f"  restricted read (weights_only, mmap)     {t_read:7.2f} s")
        print(f"  shard sha256 (same bytes)                {t_shard:7.2f} s  = {t_shard / size_gb:.2f} s/GB, "
              f"{per_tb(t_shard):.0f} min/TB")
        checksum_path(target).unlink(missing_ok=True)
    finally:
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()

    if args.shards:
        from data_prep.reader import ShardedDataset

        args.cold and drop_caches()
        start = time.perf_counter()
        dataset = ShardedDataset(args.shards, verify="fast")
        seconds = time.perf_counter() - start
        count = len(dataset.shards)
        print(f"start-up check of {args.shards} (data.verify=fast): {seconds:.3f} s for {count} shards "
              f"({seconds / count * 1000:.1f} ms per shard, independent of shard size)")


if __name__ == "__main__":
    main()
