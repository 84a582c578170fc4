"""The fused Triton attention backend computes what the reference path computes: outputs and every gradient.

On a CPU machine the kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1`` when there is no
GPU), which executes the same kernel code on CPU tensors; bf16 ``tl.dot`` is not supported by the interpreter, so
CPU checks use fp32 (exact to rounding) and fp16. On a GPU the same tests run the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the `triton` package is not installed (pip install -e '.[test]')")

from pretrain.model import DebertaConfig, DebertaForMaskedLM  # noqa: E402
from pretrain.model.attention import (  # noqa: E402
    ATTENTION_BACKENDS,
    reference_attention,
    reference_probabilities,
    triton_attention,
    triton_available,
)
from pretrain.model.relative_position import relative_position_index  # noqa: E402
from pretrain.model.triton_attention import _dropout_keep  # noqa: E402

tl = triton.language

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    """Every buffer the kernels should write starts as NaN, so an entry they miss cannot pass a comparison."""
    monkeypatch.setenv("DEBERTA_ATTENTION_DEBUG_FILL", "1")


def make_inputs(batch, heads, length, head_size, span, c2p, p2c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()

    q, k, v = (leaf(batch, heads, length, head_size) for _ in range(3))
    pos_key = leaf(heads, 2 * span, head_size) if c2p else None
    pos_query = leaf(heads, 2 * span, head_size) if p2c else None
    mask = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
    mask[-1, length // 2:] = False  # the last sequence is half padding
    grad_out = torch.randn(batch, heads, length, head_size, generator=g).to(DEVICE, dtype)
    return q, k, v, pos_key, pos_query, mask, grad_out


def outputs_and_grads(core, q, k, v, pos_key, pos_query, rel_index, mask, grad_out, scale, dropout_p=0.0):
    leaves = [t for t in (q, k, v, pos_key, pos_query) if t is not None]
    for t in leaves:
        t.grad = None
    out = core(q, k, v, pos_key, pos_query, rel_index, mask, scale, dropout_p)
    (out.float() * grad_out.float()).sum().backward()
    return out.detach().float(), [t.grad.float().clone() for t in leaves]


def assert_same(expected, actual, atol, rtol=1e-4):
    (out_e, grads_e), (out_a, grads_a) = expected, actual
    torch.testing.assert_close(out_a, out_e, atol=atol, rtol=rtol)
    assert len(grads_e) == len(grads_a)
    for name, ge, ga in zip(["q", "k", "v", "pos_1", "pos_2"], grads_e, grads_a):
        torch.testing.assert_close(ga, ge, atol=atol, rtol=rtol, msg=lambda m: f"gradient of {name}: {m}")


# (length, span, position_buckets, max_position, c2p, p2c): lengths are not multiples of the tile size, and some
# exceed max_position, so the log buckets and the clamped ends of the table (long runs of one row) are in play.
CASES = {
    "v3_log_buckets_beyond_max_position": (50, 8, 8, 16, True, True),
    "unbucketed_clipped": (33, 12, -1, -1, True, True),
    "c2p_only": (20, 8, 8, 64, True, False),
    "p2c_only": (20, 8, 8, 64, False, True),
    "no_relative_terms": (20, 8, 8, 64, False, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_fp32(case):
    length, span, buckets, max_position, c2p, p2c = CASES[case]
    q, k, v, pos_key, pos_query, mask, grad_out = make_inputs(2, 2, length, 16, span, c2p, p2c)
    rel_index = relative_position_index(length, length, span, buckets, max_position, device=DEVICE)
    args = (q, k, v, pos_key, pos_query, rel_index, mask, grad_out, 0.125)
    assert_same(outputs_and_grads(reference_attention, *args), outputs_and_grads(triton_attention, *args), atol=2e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="swaps a device function, which only the interpreter looks up at "
                                                      "run time; compiled kernels keep the one they were built with")
def test_debug_fill_exposes_a_missed_store(monkeypatch):
    """The NaN fill is what makes the parity tests see unwritten entries: without the kernels' zero stores for
    table rows a query never reaches, the table gradients (and so the relative projections' gradients) are NaN."""
    import pretrain.model.triton_attention as kernels

    @triton.jit
    def skip_zero_stores(OUT, base, offs, L, s_m, LUT, REACHED, TWO_K, lo_index, hi_index, valid,
                         BLOCK_R: tl.constexpr):
        pass

    # Distances beyond max_position are clamped: with a long sequence, rows at the table's far ends stay unreached
    # from some queries.
    q, k, v, pos_key, pos_query, mask, grad_out = make_inputs(1, 1, 20, 16, 8, True, True)
    rel_index = relative_position_index(20, 20, 8, 8, 64, device=DEVICE)
    args = (q, k, v, pos_key, pos_query, rel_index, mask, grad_out, 0.125)
    _, grads = outputs_and_grads(triton_attention, *args)
    assert all(torch.isfinite(g).all() for g in grads)
    monkeypatch.setattr(kernels, "_zero_unreached", skip_zero_stores)
    _, grads = outputs_and_grads(triton_attention, *args)
    assert torch.isnan(grads[3]).any() and torch.isnan(grads[4]).any()  # pos_key, pos_query
    assert not torch.isnan(grads[2]).any()  # v does not depend on the tables


def test_matches_reference_fp16():
    q, k, v, pos_key, pos_query, mask, grad_out = make_inputs(2, 2, 24, 32, 8, True, True, dtype=torch.float16)
    rel_index = relative_position_index(24, 24, 8, 8, 64, device=DEVICE)
    args = (q, k, v, pos_key, pos_query, rel_index, mask, grad_out, 0.125)
    # The reference computes in fp32 from the same fp16 inputs; fp16 rounding of the outputs and gradients remains.
    assert_same(outputs_and_grads(reference_attention, *args), outputs_and_grads(triton_attention, *args),
                atol=4e-3, rtol=4e-3)


@triton.jit
def _materialise_dropout_mask(out, seed, length, dropout_p, BLOCK: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    keep = _dropout_keep(seed, bh, offs, offs, length, dropout_p)
    inside = (offs[:, None] < length) & (offs[None, :] < length)
    tl.store(out + bh * length * length + offs[:, None] * length + offs[None, :], keep.to(tl.int8), mask=inside)


def test_dropout_is_the_same_mask_forward_and_backward():
    """With the kernel's own Philox mask applied to the reference probabilities, outputs and gradients agree, so
    the backward pass regenerates exactly the forward pass's mask; the mask is seeded by torch's RNG."""
    length, p = 24, 0.3
    q, k, v, pos_key, pos_query, mask, grad_out = make_inputs(2, 2, length, 16, 8, True, True)
    rel_index = relative_position_index(length, length, 8, 8, 64, device=DEVICE)

    torch.manual_seed(7)
    fast = outputs_and_grads(triton_attention, q, k, v, pos_key, pos_query, rel_index, mask, grad_out, 0.125, p)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))  # the draw the backend makes
    keep = torch.empty(2 * 2, length, length, dtype=torch.int8, device=DEVICE)
    _materialise_dropout_mask[(4,)](keep, seed, length, p, BLOCK=32)
    keep = keep.view(2, 2, length, length).bool()
    assert 0.2 < 1 - keep.float().mean().item() < 0.4  # about p of the entries are dropped

    def masked_reference(q, k, v, pos_key, pos_query, rel_index, mask, scale, dropout_p):
        probs = reference_probabilities(q, k, pos_key, pos_query, rel_index, mask, scale)
        return (probs * keep / (1 - dropout_p)) @ v

    expected = outputs_and_grads(masked_reference, q, k, v, pos_key, pos_query, rel_index, mask, grad_out, 0.125, p)
    assert_same(expected, fast, atol=2e-5)

    torch.manual_seed(8)  # another seed, another mask
    other, _ = outputs_and_grads(triton_attention, q, k, v, pos_key, pos_query, rel_index, mask, grad_out, 0.125, p)
    assert not torch.allclose(other, fast[0])


TINY_V3 = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=64, position_buckets=16, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
               share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TINY_V2 = dict(TINY_V3, position_buckets=-1, max_relative_positions=24, share_att_key=False, norm_rel_ebd="none",
               position_biased_input=True, pos_att_type=["c2p", "p2c"])


@pytest.mark.parametrize("geometry", ["v3", "v2"])
def test_whole_model_with_emd_matches_reference(geometry):
    """MLM loss through the enhanced mask decoder (whose queries differ from its keys) and every parameter
    gradient, with padding and a sequence longer than max_position_embeddings."""
    torch.manual_seed(0)
    config = DebertaConfig(**(TINY_V3 if geometry == "v3" else TINY_V2))
    model = DebertaForMaskedLM(config).to(DEVICE)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, config.vocab_size, (2, 60), generator=g).to(DEVICE)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 45:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, ::5] = ids[:, ::5]
    labels[attention_mask == 0] = -100

    results = []
    for backend in ("reference", "triton"):
        model.set_attention_backend(backend)
        model.zero_grad()
        loss = model(ids, attention_mask, labels=labels, use_emd=True).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_ref, grads_ref), (loss_fast, grads_fast) = results
    torch.testing.assert_close(loss_fast, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads_ref.keys() == grads_fast.keys()
    assert any("pos_key_proj" in n or "rel_embeddings" in n for n in grads_ref)  # the relative path has gradients
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_compiles_without_graph_breaks():
    """The kernel is a registered custom op with a fake implementation, so ``torch.compile(fullgraph=True)`` of
    an attention layer traces it as one node (no graph break) and gives the eager result and gradients."""
    from pretrain.model.attention import DisentangledSelfAttention

    torch.manual_seed(0)
    config = DebertaConfig(**TINY_V3)
    layer = DisentangledSelfAttention(config).to(DEVICE)
    layer.backend = "triton"
    hidden = torch.randn(2, 20, 64, device=DEVICE)
    rel_table = torch.randn(32, 64, device=DEVICE)
    rel_index = relative_position_index(20, 20, 16, 16, 64, device=DEVICE)
    mask = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    grad = torch.randn(2, 20, 64, device=DEVICE)
    results = []
    for module in (layer, torch.compile(layer, fullgraph=True)):
        layer.zero_grad()
        out = module(hidden, mask, rel_table, rel_index)
        (out * grad).sum().backward()  # the backward custom op goes through AOTAutograd too
        results.append((out.detach(), [p.grad.clone() for p in layer.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for ge, gc in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-4)


def test_auto_backend_choice():
    """auto: the kernel for CUDA tensors, the reference path on CPU (where FlexAttention/Triton cannot train)."""
    q, k, v, pos_key, pos_query, mask, _ = make_inputs(1, 1, 8, 16, 4, True, True, seed=1)
    rel_index = relative_position_index(8, 8, 4, 4, 16, device=DEVICE)
    with torch.no_grad():
        auto = ATTENTION_BACKENDS["auto"](q, k, v, pos_key, pos_query, rel_index, mask, 0.125, 0.0)
        ref = reference_attention(q, k, v, pos_key, pos_query, rel_index, mask, 0.125, 0.0)
    torch.testing.assert_close(auto, ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="head size 12"):
        triton_attention(q[..., :12], k[..., :12], v[..., :12], None, None, rel_index, mask, 0.125, 0.0)


def test_custom_op_registration():
    """torch.library.opcheck: schema, fake (meta) implementation against the real one, autograd registration and
    AOT dispatch, the properties torch.compile relies on."""
    from pretrain.model.triton_attention import relative_lookup

    q, k, v, pos_key, pos_query, mask, _ = make_inputs(1, 2, 20, 16, 8, True, True, seed=2)
    rel_index = relative_position_index(20, 20, 8, 8, 64, device=DEVICE)
    code, reached = relative_lookup(rel_index, 16)
    seed = torch.zeros((), dtype=torch.int64)
    args = (q, k, v, pos_key, pos_query, code, reached, mask.to(torch.uint8), 0.125, 0.0, seed)
    torch.library.opcheck(torch.ops.deberta_pretrain.disentangled_attention.default, args)


def test_compiled_dropout_follows_torch_seed():
    """Under torch.compile the kernel's dropout seed is still drawn from torch's generator: the same seed gives
    the same output, another seed another mask (what exact resume relies on)."""
    from pretrain.model.attention import DisentangledSelfAttention

    torch.manual_seed(0)
    layer = DisentangledSelfAttention(DebertaConfig(**dict(TINY_V3, attention_probs_dropout_prob=0.1))).to(DEVICE)
    layer.backend = "triton"
    compiled = torch.compile(layer.train(), fullgraph=True)
    hidden = torch.randn(2, 20, 64, device=DEVICE)
    args = (hidden, torch.ones(2, 20, dtype=torch.bool, device=DEVICE), torch.randn(32, 64, device=DEVICE),
            relative_position_index(20, 20, 16, 16, 64, device=DEVICE))
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        out = compiled(*args)
        out.sum().backward()
        outputs.append(out.detach())
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def saved_bytes(core, length: int) -> int:
    """Bytes autograd keeps from the forward pass of one attention core call until its backward pass."""
    q, k, v, pos_key, pos_query, mask, _ = make_inputs(2, 2, length, 16, 8, True, True)
    rel_index = relative_position_index(length, length, 8, 8, 64, device=DEVICE)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        core(q, k, v, pos_key, pos_query, rel_index, mask, 0.125, 0.0)
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, pos_key, pos_query)}
    return sum(n for ptr, n in storages.items() if ptr not in inputs)


def test_memory_kept_for_backward_grows_linearly_with_length():
    """What the forward pass keeps for the backward pass: linear in L for the kernel (output, log-sum-exp, lookup
    codes), quadratic for the reference path (probabilities and scores), which shows the measurement sees it."""
    fast = [saved_bytes(triton_attention, n) for n in (64, 256)]  # 4x the length
    slow = [saved_bytes(reference_attention, n) for n in (64, 256)]
    assert fast[1] / fast[0] < 4.5, fast
    assert slow[1] / slow[0] > 10, slow
    assert fast[1] < 2 * 2 * 256 * 256 * 4  # less than a single fp32 (B, N, L, L) tensor


def test_launch_grid_keeps_large_batches_within_cuda_limits():
    """Batch x heads beyond 65,535 (an evaluation batch of 6,000 sequences at 12 heads) must launch: CUDA caps grid
    axes 1 and 2 at 65,535, axis 0 at 2^31 - 1. The tiles of L stay on axis 0 (the L2 reuse of one head's K/V)."""
    from pretrain.model.triton_attention import MAX_GRID_YZ, launch_grid

    batch, heads, length = 6000, 12, 512
    assert batch * heads > MAX_GRID_YZ
    grid = launch_grid(length, 128, batch, heads)
    assert grid == (4, heads, batch)
    assert grid[0] <= 2**31 - 1 and max(grid[1:]) <= MAX_GRID_YZ
    assert grid[0] * grid[1] * grid[2] == 4 * batch * heads  # one program per (tile, head, sequence)
    with pytest.raises(ValueError, match="at most 65535 sequences and heads per call"):
        launch_grid(length, 128, MAX_GRID_YZ + 1, heads)
