"""Ahead-of-time compilation of the attention kernels for a named NVIDIA GPU, on any machine, and what they use.

Why: the kernels' first real run is on a rented GPU with minutes of budget. Triton compiles for a target
architecture without a GPU (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, with the ``ptxas``
its wheel ships), so compile errors, register spills, shared memory beyond the card and the kind of tensor-core
instruction (``wgmma`` on Hopper, ``mma.sync`` otherwise) are all known before the GPU is.

Each :class:`Variant` is one specialisation the host code can launch (kernel, dtype, head size, dropout, position
terms, launch configuration), compiled with the same argument types and divisibility hints a launch at the
v3-base shape gets. :func:`compile_variant` returns its :class:`Resources`: registers per thread, spilled bytes,
stack, shared memory, MMA kind. ``python bench/kernel_resources.py`` prints the table for every variant.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pretrain.model import triton_attention as kernels
from pretrain.model.triton_attention import KERNELS, LaunchConfig

DTYPES = ("bf16", "fp16", "fp32")
HEAD_DIMS = (64, 128)
# Shared memory per block (opt-in maximum) and registers per thread, per compute capability major.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255

# Kernel argument name -> Triton type: tensors of the run's dtype, and the kernels' own metadata tensors.
_DATA_POINTERS = {"Q", "K", "V", "POS_K", "POS_Q", "O", "DO", "DQ", "DK", "DV", "DC2P", "DP2C"}
_OTHER_POINTERS = {"LUT": "*i32", "MASK": "*u8", "REACHED": "*u8", "LSE": "*fp32", "DELTA": "*fp32"}
_FLOATS = {"scale", "dropout_p"}
_CONSTEXPRS = {"HEAD_DIM", "HAS_C2P", "HAS_P2C", "HAS_DROPOUT", "IEEE", "BLOCK_M", "BLOCK_N", "WINDOW"}


@dataclass(frozen=True)
class Variant:
    kernel: str  # one of triton_attention.KERNELS
    dtype: str  # bf16 | fp16 | fp32
    head_dim: int
    dropout: bool
    config: LaunchConfig
    c2p: bool = True
    p2c: bool = True

    def label(self) -> str:
        c = self.config
        terms = "+".join(t for t, on in (("c2p", self.c2p), ("p2c", self.p2c)) if on) or "none"
        return (f"{self.kernel} {self.dtype} d={self.head_dim}{' dropout' if self.dropout else ''} {terms} "
                f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}")


@dataclass(frozen=True)
class Resources:
    arch: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int
    mma: str  # wgmma | mma.sync | none

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0

    def problems(self) -> list[str]:
        """Why this variant would run badly or not at all on the target (empty when it is fine)."""
        found = []
        if self.spills:
            found.append(f"spills {self.spill_store_bytes} B stored / {self.spill_load_bytes} B loaded per thread")
        limit = SHARED_MEMORY_LIMIT.get(self.arch)
        if limit is not None and self.shared_bytes > limit:
            found.append(f"shared memory {self.shared_bytes} B > {limit} B")
        return found


BOTH_TERMS = ((True, True),)
ALL_TERMS = ((True, True), (True, False), (False, True), (False, False))  # (c2p, p2c): pos_att_type's choices


def pinned_variants(arch: int, dtypes=DTYPES, head_dims=HEAD_DIMS, dropouts=(False, True),
                    kernel_names=KERNELS, terms=BOTH_TERMS) -> list[Variant]:
    """The variants a launch on ``arch`` compiles with autotuning off; by default with both position terms
    (DeBERTa's ``pos_att_type``), ``terms=ALL_TERMS`` adds c2p-only, p2c-only and none."""
    variants = [Variant(kernel, dtype, d, dropout, kernels.pinned_config(kernel, arch // 10, dtype, d),
                        c2p, p2c)
                for kernel, dtype, d, dropout, (c2p, p2c)
                in itertools.product(kernel_names, dtypes, head_dims, dropouts, terms)]
    # The backward pass's small pre-pass (one fixed configuration, no dropout or position terms).
    variants += [Variant("delta", dtype, d, False, kernels._DELTA_CONFIG, c2p=False, p2c=False)
                 for dtype, d in itertools.product(dtypes, head_dims)]
    return variants


def _source(variant: Variant) -> ASTSource:
    """The kernel with argument types and constants as a launch at the v3-base shape specialises them."""
    if kernels.INTERPRETING:
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset: with it, Triton's interpreter "
                           "replaces the kernels by Python functions (run in a process without it)")
    fn = kernels._RAW_KERNELS[variant.kernel]
    constants = dict(HEAD_DIM=variant.head_dim, HAS_C2P=variant.c2p, HAS_P2C=variant.p2c,
                     HAS_DROPOUT=variant.dropout, IEEE=variant.dtype == "fp32", **variant.config.meta())
    constants = {name: value for name, value in constants.items() if name in fn.arg_names}
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in _CONSTEXPRS:
            signature[name] = "constexpr"
        elif name in _DATA_POINTERS:
            signature[name] = f"*{variant.dtype}"
        elif name in _OTHER_POINTERS:
            signature[name] = _OTHER_POINTERS[name]
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:  # strides, sizes and the dropout seed
            signature[name] = "i32"
        # Launches at the v3-base shape: 16-byte aligned tensors and strides/sizes that are multiples of 16.
        if signature[name].startswith("*") or (signature[name] == "i32" and name not in ("seed", "N_HEADS")):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constants, attrs=attrs)


def compile_variant(variant: Variant, arch: int) -> tuple[Resources, object]:
    """Compile ``variant`` for compute capability ``arch`` (80, 90, ...) and read its resource use."""
    compiled = triton.compile(_source(variant), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=variant.config.num_warps, num_stages=variant.config.num_stages))
    ptx = compiled.asm["ptx"]
    usage = ptxas_usage(ptx, arch)
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    return Resources(arch=arch, shared_bytes=int(compiled.metadata.shared), mma=mma, **usage), compiled


def _ptxas(arch: int) -> str:
    """The ptxas bundled with Triton (its signature differs between releases)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(arch).path
    except TypeError:
        return get_ptxas().path


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spills and stack from ``ptxas -v`` (the assembler Triton itself runs) on the PTX."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", str(source), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=True)
    log = done.stderr + done.stdout

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return dict(registers=number(r"Used (\d+) registers"), spill_store_bytes=number(r"(\d+) bytes spill stores"),
                spill_load_bytes=number(r"(\d+) bytes spill loads"), stack_bytes=number(r"(\d+) bytes stack frame"))


def resource_row(variant: Variant, arch: int) -> dict:
    """One row of the resource table (a compile failure is a row too, with the error)."""
    row = {"arch": f"sm_{arch}", "variant": variant.label(), **asdict(variant)}
    row["config"] = asdict(variant.config)
    try:
        resources, _ = compile_variant(variant, arch)
    except Exception as error:  # noqa: BLE001 - the table reports every failure instead of stopping at the first
        row.update(status="compile error", error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
        return row
    row.update(status="ok", **asdict(resources), problems=resources.problems())
    row["arch"] = f"sm_{arch}"
    return row


def _row(job: tuple[Variant, int]) -> dict:
    return resource_row(*job)


def compile_rows(jobs: list[tuple[Variant, int]], workers: int = 1) -> list[dict]:
    """:func:`resource_row` of every (variant, arch) job, in parallel processes (Triton's passes and ptxas are
    single-threaded)."""
    if workers <= 1:
        return [_row(job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_row, jobs))
