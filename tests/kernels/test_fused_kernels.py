"""The Triton kernels (RMSNorm, RoPE, SwiGLU, LM-head cross-entropy) give the references' results, forward
and backward, run on a CPU under Triton's interpreter (TRITON_INTERPRET=1); without Triton they are exactly
the references; a model with them on trains like one with them off; and torch.compile takes them whole.

The interpreter runs each Triton program in Python: the shapes here are tiny and the programs few.
"""

from __future__ import annotations

import pytest
import torch

import moecpt.kernels.cross_entropy as ce_mod
import moecpt.kernels.rmsnorm as rms_mod
import moecpt.kernels.rope as rope_mod
import moecpt.kernels.swiglu as swiglu_mod
from moecpt.config import IGNORE_INDEX
from moecpt.kernels.support import interpreting, triton_usable, why_not_triton
from moecpt.model import MixtralForCausalLM
from moecpt.model.config import MixtralConfig
from moecpt.model.rope import rope_tables

pytest.importorskip("triton", reason="the fused kernels need Triton (pip install triton)")

KERNEL_MODULES = {"rms_norm": rms_mod, "rope": rope_mod, "swiglu": swiglu_mod, "cross_entropy": ce_mod}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Triton's interpreter on the CPU: the fused ops run Triton where `triton_usable`. moecpt defines its
    kernels on first use, so setting the switch here is in time for them (see `_triton_interprets` for
    Triton's own part)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting() and triton_usable("cpu"), why_not_triton("cpu")


def _triton_interprets() -> bool:
    """Whether Triton itself was imported in interpreter mode. Triton builds its library of jitted helpers
    (tl.sum, tl.sigmoid, ...) when first imported, so TRITON_INTERPRET=1 set later makes moecpt's kernels
    interpreted but their calls to those helpers fail ("Cannot call @triton.jit'd outside of the scope of a
    kernel"). tests/conftest.py sets it before anything imports Triton (unless MOECPT_TEST_TRITON_NATIVE)."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.sum, JITFunction)


@pytest.fixture
def triton_runs(_interpret) -> None:
    """For the tests that launch the kernels on CPU tensors."""
    if not _triton_interprets():
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set (e.g. MOECPT_TEST_TRITON_NATIVE), "
                    "so its kernels cannot run on CPU tensors in this session")


@pytest.fixture
def launches(monkeypatch) -> dict[str, list[int]]:
    """Counts, per kernel module, how often its Triton kernels were fetched to be launched: proof that a
    fused call really ran Triton (or, in the fallback, that it did not)."""
    counts: dict[str, list[int]] = {}
    for name, mod in KERNEL_MODULES.items():
        calls = counts[name] = []
        original = mod._kernels

        def counting(original=original, calls=calls):
            calls.append(1)
            return original()

        monkeypatch.setattr(mod, "_kernels", counting)
    return counts


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """fp32: the fused kernel and the reference agree to float rounding (~1e-5 relative).

    bf16: within a couple of bf16 ulps (2^-8 relative each) of the values' magnitude. The kernels compute in
    fp32 and round to bf16 once at the end, while the references round some intermediates to bf16 (e.g.
    silu(gate) before the product with up, the normalised row before the weight), so the two may differ by
    a rounding or two, relative to the largest values around, not to each (possibly tiny) element.
    """
    assert got.dtype == want.dtype and got.shape == want.shape, msg
    got, want = got.float(), want.float()
    scale = want.abs().max().item() or 1.0
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=msg or None)
    else:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2 * scale, msg=msg or None)


def _fwd_bwd(fn, inputs: list[torch.Tensor], upstream: torch.Tensor | None = None, **kw):
    """fn(*inputs) and the gradients of <fn(...), upstream> for the floating-point inputs."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves, **kw)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(out.dtype)
    grads = torch.autograd.grad(out, [x for x in leaves if x.requires_grad], upstream)
    return out.detach(), list(grads)


# ---- RMSNorm ---------------------------------------------------------------------------------------------

def test_rmsnorm_backward_programs_on_cpu():
    """The premise of the row counts below: on a CPU the backward runs 4 * 4 = 16 programs (fewer if there
    are fewer rows), each looping over ceil(rows / programs) rows."""
    assert rms_mod._sm_count(torch.device("cpu")) == 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 24), (2, 9, 48), (5, 64), (1, 20)],
                         ids=["37rows_not_divisible", "3d_18rows", "fewer_rows_than_programs", "one_row"])
@pytest.mark.usefixtures("triton_runs")
def test_rmsnorm_matches_reference(launches, shape, dtype):
    # 37 rows over 16 programs: 3 rows each, the 13th program has one real row, the last three none.
    # Widths 24, 48 and 20 are not powers of two: the row block is masked.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    upstream = torch.randn(shape, generator=g).to(dtype)
    want, want_grads = _fwd_bwd(rms_mod.rms_norm_reference, [x, w], upstream, eps=1e-5)
    got, got_grads = _fwd_bwd(rms_mod.rms_norm, [x, w], upstream, eps=1e-5, fused=True)
    assert len(launches["rms_norm"]) == 2  # forward and backward kernels both ran
    _assert_close(got, want, dtype, "y")
    _assert_close(got_grads[0], want_grads[0], dtype, "dx")
    _assert_close(got_grads[1], want_grads[1], dtype, "dweight")


@pytest.mark.usefixtures("triton_runs")
def test_rmsnorm_bf16_input_fp32_weight_promotes_like_the_reference(launches):
    """The model's case outside autocast's casts: bf16 activations, fp32 weight (output fp32)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=g).bfloat16()
    w = 1 + 0.5 * torch.randn(40, generator=g)
    upstream = torch.randn(6, 40, generator=g)
    want, want_grads = _fwd_bwd(rms_mod.rms_norm_reference, [x, w], upstream, eps=1e-6)
    got, got_grads = _fwd_bwd(rms_mod.rms_norm, [x, w], upstream, eps=1e-6, fused=True)
    assert len(launches["rms_norm"]) == 2
    assert got.dtype == torch.float32 and got_grads[0].dtype == torch.bfloat16 and got_grads[1].dtype == torch.float32
    _assert_close(got, want, torch.bfloat16, "y")
    _assert_close(got_grads[0], want_grads[0], torch.bfloat16, "dx")
    _assert_close(got_grads[1], want_grads[1], torch.bfloat16, "dweight")


# ---- RoPE ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,head_dim", [(3, 8), (2, 12)], ids=["3heads_dim8", "2heads_dim12"])
@pytest.mark.usefixtures("triton_runs")
def test_rope_matches_reference(launches, heads, head_dim, dtype):
    # 3 heads (a GQA-like count, not a power of two) and a half-width of 6: both blocks are masked.
    B, T = 2, 5
    g = torch.Generator().manual_seed(2)
    positions = torch.arange(T).expand(B, T) + torch.tensor([[7], [1000]])  # non-zero, different per row
    cos, sin = rope_tables(positions, head_dim, 1e4)
    x = torch.randn(B, T, heads, head_dim, generator=g).to(dtype)
    upstream = torch.randn(B, T, heads, head_dim, generator=g).to(dtype)
    want, want_grads = _fwd_bwd(rope_mod.rope_reference, [x], upstream, cos=cos, sin=sin)
    got, got_grads = _fwd_bwd(rope_mod.apply_rope, [x], upstream, cos=cos, sin=sin, fused=True)
    assert len(launches["rope"]) == 2
    _assert_close(got, want, dtype, "y")
    _assert_close(got_grads[0], want_grads[0], dtype, "dx")
    # Rotation keeps each pair's norm: an independent check of the tables' use (positions matter).
    if dtype == torch.float32:
        torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, x)


@pytest.mark.usefixtures("triton_runs")
def test_rope_on_a_non_contiguous_input(launches):
    """The model passes a view of the projection ([B, T, heads * D] viewed [B, T, heads, D]); a transposed
    input is made contiguous first and still rotated correctly."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 8, generator=g).transpose(1, 2)  # [B, T=4, heads=3, D=8], not contiguous
    cos, sin = rope_tables(torch.arange(5, 9).expand(2, 4), 8, 1e6)
    torch.testing.assert_close(rope_mod.apply_rope(x, cos, sin, fused=True), rope_mod.rope_reference(x, cos, sin),
                               rtol=1e-5, atol=1e-6)
    assert launches["rope"]


# ---- SwiGLU ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ffn,block", [(40, 16), (37, 1024)], ids=["F40_over_3_column_programs", "F37_one_program"])
@pytest.mark.usefixtures("triton_runs")
def test_swiglu_matches_reference(monkeypatch, launches, ffn, block, dtype):
    # BLOCK 16 stands in for F > 1024: F = 40 needs three column programs, the last one partly masked.
    monkeypatch.setattr(swiglu_mod, "BLOCK", block)
    g = torch.Generator().manual_seed(4)
    h = (torch.randn(7, 2 * ffn, generator=g) * 3).to(dtype)
    upstream = torch.randn(7, ffn, generator=g).to(dtype)
    want, want_grads = _fwd_bwd(swiglu_mod.swiglu_reference, [h], upstream)
    got, got_grads = _fwd_bwd(swiglu_mod.swiglu, [h], upstream, fused=True)
    assert len(launches["swiglu"]) == 2
    _assert_close(got, want, dtype, "y")
    _assert_close(got_grads[0], want_grads[0], dtype, "dh")


# ---- LM head + cross-entropy -----------------------------------------------------------------------------

N, H, V = 13, 16, 300


def _ce_inputs(dtype=torch.float32, logit_scale=1.0, ignore_index=IGNORE_INDEX, seed=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * (logit_scale / H**0.5)
    t = torch.randint(0, V, (N,), generator=g)
    t[0], t[1] = V - 1, 0  # the last (partly masked) vocabulary block, and the first column
    t[5:10] = ignore_index  # one whole chunk of 5 ignored, with chunk_tokens 5 ...
    t[12] = ignore_index  # ... and the short last chunk (13 = 5 + 5 + 3) partly
    upstream = torch.rand(N, generator=g)  # per-token weights
    return h.to(dtype), w.to(dtype), t, upstream


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("logit_scale", [1.0, 40.0], ids=["logits_O1", "logits_O40"])
@pytest.mark.parametrize("chunk", [5, 1000], ids=["chunk5_of_13", "one_chunk"])
@pytest.mark.usefixtures("triton_runs")
def test_cross_entropy_matches_reference(monkeypatch, launches, chunk, logit_scale, dtype):
    # VOCAB_BLOCK 64 stands in for a vocabulary of many 4096-blocks: 300 = 4 x 64 + 44, so the online
    # logsumexp rescales over five blocks, the last partly masked. Large logits check its stability.
    monkeypatch.setattr(ce_mod, "VOCAB_BLOCK", 64)
    h, w, t, upstream = _ce_inputs(dtype, logit_scale)
    want, want_grads = _fwd_bwd(ce_mod.linear_cross_entropy_reference, [h, w, t], upstream)
    got, got_grads = _fwd_bwd(ce_mod.linear_cross_entropy, [h, w, t], upstream, chunk_tokens=chunk, fused=True)
    assert len(launches["cross_entropy"]) == 2 * -(-N // chunk)  # both kernels, once per chunk
    assert got.dtype == torch.float32 and got_grads[0].dtype == got_grads[1].dtype == dtype
    ignored = t == IGNORE_INDEX
    assert (got[ignored] == 0).all() and (got[~ignored] > 0).all()
    assert (got_grads[0][ignored] == 0).all()  # an ignored token sends no gradient to its hidden state
    # The loss is fp32 from the same logits either way (in bf16 the head's matmul rounds the logits
    # identically); only the gradients go through bf16 roundings.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_close(got_grads[0], want_grads[0], dtype, "dhidden")
    _assert_close(got_grads[1], want_grads[1], dtype, "dweight")


@pytest.mark.usefixtures("triton_runs")
def test_cross_entropy_all_ignored_gives_zero_loss_and_gradients(monkeypatch, launches):
    monkeypatch.setattr(ce_mod, "VOCAB_BLOCK", 64)
    h, w, _, upstream = _ce_inputs()
    t = torch.full((N,), IGNORE_INDEX)
    got, (dh, dw) = _fwd_bwd(ce_mod.linear_cross_entropy, [h, w, t], upstream, chunk_tokens=4, fused=True)
    assert launches["cross_entropy"]
    assert torch.equal(got, torch.zeros(N))
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.usefixtures("triton_runs")
def test_cross_entropy_custom_ignore_index(monkeypatch, launches):
    monkeypatch.setattr(ce_mod, "VOCAB_BLOCK", 64)
    h, w, t, upstream = _ce_inputs(ignore_index=-1)
    want, want_grads = _fwd_bwd(ce_mod.linear_cross_entropy_reference, [h, w, t], upstream, ignore_index=-1)
    got, got_grads = _fwd_bwd(ce_mod.linear_cross_entropy, [h, w, t], upstream, chunk_tokens=6, ignore_index=-1,
                              fused=True)
    assert launches["cross_entropy"]
    assert (got[t == -1] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        _assert_close(a, b, torch.float32)


@pytest.mark.usefixtures("triton_runs")
def test_cross_entropy_under_autocast_matches_the_reference_under_autocast(monkeypatch, launches):
    """fp32 master weights, bf16 autocast: the head runs in bf16, the gradients come back fp32."""
    monkeypatch.setattr(ce_mod, "VOCAB_BLOCK", 64)
    h, w, t, upstream = _ce_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _fwd_bwd(ce_mod.linear_cross_entropy_reference, [h, w, t], upstream)
        got, got_grads = _fwd_bwd(ce_mod.linear_cross_entropy, [h, w, t], upstream, chunk_tokens=5, fused=True)
    assert launches["cross_entropy"]
    assert got_grads[0].dtype == got_grads[1].dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        _assert_close(a, b, torch.bfloat16)


# ---- fallback --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env", [None, "0", ""], ids=["unset", "zero", "empty"])
def test_without_the_interpreter_a_cpu_gets_exactly_the_references(monkeypatch, launches, env):
    """The kernels are chosen once, where the model is built: asking for them where Triton cannot run gives
    the PyTorch references, exactly, and no op checks again per call."""
    if env is None:
        monkeypatch.delenv("TRITON_INTERPRET")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", env)
    assert not triton_usable("cpu") and not triton_usable(torch.device("cpu"))
    assert "TRITON_INTERPRET" in why_not_triton("cpu")
    asked, plain = _tiny_model(seed=3), _tiny_model(seed=3)
    assert asked.use_kernels(True, loss_chunk_tokens=5) is False
    plain.use_kernels(False, loss_chunk_tokens=5)
    assert not asked.loss_fn.fused and not any(getattr(m, "fused", False) for m in asked.modules())
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    got = asked(ids[:, :-1], targets=ids[:, 1:])
    want = plain(ids[:, :-1], targets=ids[:, 1:])
    got.loss.backward()
    want.loss.backward()
    assert torch.equal(got.token_loss, want.token_loss)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(asked.parameters(), plain.parameters(), strict=True))
    assert not any(launches.values()), "a Triton kernel was launched without Triton being usable"


# ---- the whole model -------------------------------------------------------------------------------------

def _tiny_model(seed=0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig.from_preset("tiny", num_hidden_layers=1, vocab_size=300))


@pytest.mark.usefixtures("triton_runs")
def test_model_with_kernels_trains_like_without(monkeypatch, launches):
    monkeypatch.setattr(ce_mod, "VOCAB_BLOCK", 64)
    model = _tiny_model()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 300, (2, 16), generator=g)
    targets = torch.randint(0, 300, (2, 16), generator=g)
    targets[0, :4] = IGNORE_INDEX
    results = {}
    for fused in (False, True):
        model.use_kernels(fused, loss_chunk_tokens=7)  # 32 tokens: chunks of 7, 7, 7, 7, 4
        model.zero_grad()
        out = model(ids, targets=targets)
        out.loss.backward()
        results[fused] = out, {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, calls in launches.items():
        assert calls, f"the {name} kernel never ran with use_kernels(True)"
    (plain, g_plain), (fused, g_fused) = results[False], results[True]
    assert torch.equal(fused.expert_counts, plain.expert_counts)  # the same routing
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(fused.token_loss, plain.token_loss, rtol=1e-5, atol=1e-6)
    assert (fused.token_loss[0, :4] == 0).all()
    assert g_fused.keys() == g_plain.keys()
    for name in g_plain:
        _assert_close(g_fused[name], g_plain[name], torch.float32, name)


# ---- torch.compile ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "no_kernels"])
def test_compiled_decoder_layer_has_no_graph_break(request, launches, fused, autocast):
    """fullgraph=True raises on any graph break: each kernel is one opaque custom op to Dynamo."""
    if fused:
        request.getfixturevalue("triton_runs")
    torch._dynamo.reset()
    model = _tiny_model(seed=1)
    model.use_kernels(fused)
    layer = model.layers[0]
    cfg = model.config
    g = torch.Generator().manual_seed(8)
    B, T = 2, 16
    x = torch.randn(B, T, cfg.hidden_size, generator=g)
    cos, sin = rope_tables(torch.arange(3, 3 + T).expand(B, T), cfg.attn_head_dim, cfg.rope_theta)
    upstream = torch.randn(B, T, cfg.hidden_size, generator=g)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    params = list(layer.parameters())

    def run(fn):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, stats = fn(xx, cos, sin, mask=None, token_mask=None)
        grads = torch.autograd.grad(out, [xx, *params], upstream)
        return out.detach(), stats, grads

    want, want_stats, want_grads = run(layer)
    got, got_stats, got_grads = run(compiled)
    if fused:
        for name in ("rms_norm", "rope", "swiglu"):
            assert launches[name], f"the compiled layer did not run the {name} kernel"
    dtype = torch.bfloat16 if autocast else torch.float32
    _assert_close(got, want, dtype, "out")
    assert torch.equal(got_stats.tokens_per_expert, want_stats.tokens_per_expert)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, got_grads, want_grads, strict=True):
        _assert_close(a, b, dtype, name)
