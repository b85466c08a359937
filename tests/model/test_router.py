"""The router as configuration, the balancing-loss scopes and the aux-loss-free selection bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecpt.model import MixtralConfig, MixtralForCausalLM
from moecpt.model.loss import load_balancing_loss
from moecpt.model.moe import Router, SparseMoeBlock, update_router_bias


def _router(**kw) -> Router:
    torch.manual_seed(0)
    r = Router(16, 8, 2, **kw)
    torch.nn.init.normal_(r.weight)
    return r


def test_softmax_router_renormalises_only_when_asked():
    x = torch.randn(5, 16)
    logits, scores, w, e = _router(norm_topk=True)(x)
    torch.testing.assert_close(scores, logits.softmax(-1))
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    _, scores2, w2, e2 = _router(norm_topk=False)(x)
    assert torch.equal(e, e2)
    torch.testing.assert_close(w2, scores2.gather(1, e2))  # the raw probabilities of the chosen experts


def test_sigmoid_router_scales_its_normalised_weights():
    x = torch.randn(5, 16)
    logits, scores, w, e = _router(scoring="sigmoid", norm_topk=True, scale=2.5)(x)
    torch.testing.assert_close(scores, logits.sigmoid())
    torch.testing.assert_close(w.sum(-1), torch.full((5,), 2.5))


def test_selection_bias_changes_the_choice_never_the_weights():
    x = torch.randn(64, 16)
    r = _router(norm_topk=False, bias=True)
    _, scores, _, plain = r(x)
    r.e_score_correction_bias[3] = 10.0  # expert 3 is chosen by every token...
    _, _, w, biased = r(x)
    assert (biased == 3).any(-1).all() and not (plain == 3).any(-1).all()
    torch.testing.assert_close(w, scores.gather(1, biased))  # ...with its unbiased score as weight


def test_bias_moves_a_skewed_router_toward_uniform_load():
    torch.manual_seed(0)
    block = SparseMoeBlock(16, 8, 8, 2, router={"bias": True})
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        block.gate.weight[0] += 0.5  # experts 0 and 1 get most tokens
        block.gate.weight[1] += 0.4
    x = torch.randn(1, 512, 16)

    def load() -> torch.Tensor:
        return block(x)[1].tokens_per_expert.sum(0)

    def imbalance(load_E: torch.Tensor) -> float:
        return (load_E.max() / load_E.mean()).item()

    start = imbalance(load())
    late = []
    for step in range(60):
        load_E = load()
        late += [imbalance(load_E)] if step >= 40 else []
        update_router_bias(block, load_E[None], rate=0.01)
    # The sign rule overshoots by one step of `rate` around balance: judge the mean of the last steps.
    assert start > 1.5 and sum(late) / len(late) < 1.25, (start, late)
    assert torch.equal(block.gate.e_score_correction_bias.argsort()[:2].sort().values, torch.tensor([0, 1]))


def _tiny(**kw) -> MixtralForCausalLM:
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=48,
                                                        **kw))


def test_sequence_scope_is_the_mean_of_each_sequence_alone():
    model = _tiny()
    ids = torch.randint(0, 64, (3, 10))
    _, stats = model.trunk(ids, None, None, False, None, None)
    per_seq = []
    for b in range(3):
        _, s = model.trunk(ids[b:b + 1], None, None, False, None, None)
        per_seq.append(load_balancing_loss(s, 4, "micro_batch"))
    torch.testing.assert_close(load_balancing_loss(stats, 4, "sequence"), torch.stack(per_seq).mean())
    assert not torch.allclose(load_balancing_loss(stats, 4, "micro_batch"), torch.stack(per_seq).mean())


def test_the_model_loss_uses_the_configured_scope():
    ids = torch.randint(0, 64, (3, 10))
    outs = {scope: _tiny(router_balance_scope=scope)(ids, labels=ids) for scope in ("micro_batch", "sequence")}
    assert outs["micro_batch"].aux_loss.item() != outs["sequence"].aux_loss.item()
    torch.testing.assert_close(outs["micro_batch"].logits, outs["sequence"].logits)


def test_bias_is_state_saved_with_the_model_and_said_to_be_dropped_on_export(tmp_path):
    model = _tiny(router_bias_update_rate=1e-3)
    names = [n for n, _ in model.named_buffers()]
    assert names == [f"layers.{i}.moe.gate.e_score_correction_bias" for i in range(2)]
    assert all(n not in dict(model.named_parameters()) for n in names)
    assert set(names) <= set(model.state_dict())
    ids = torch.randint(0, 64, (2, 6))
    before = model(ids).logits
    model.layers[0].moe.gate.e_score_correction_bias[0] = 5.0  # expert 0 for every token of layer 0
    assert F.mse_loss(model(ids).logits, before) > 0
    with pytest.warns(UserWarning, match="selection bias.*not exported"):
        model.save_pretrained(tmp_path / "hf")
