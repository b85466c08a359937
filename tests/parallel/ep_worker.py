"""Run under torchrun (gloo): a tiny Mixtral whose router is forced to send every token to experts 0 and 1,
so that under expert parallelism the ranks owning experts 2 and 3 receive no rows at all. Checks, against one
device, the forward outputs and the gradients of FSDP (expert_parallel 1) and FSDP + EP, then one optimizer
step, and writes per-rank results (and sharded-state bytes) as JSON to argv[1]."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from moecpt.config import OptimizerSection, ParallelSection
from moecpt.model import MixtralForCausalLM
from moecpt.model.config import MixtralConfig
from moecpt.model.moe import Router
from moecpt.parallel.parallelize import clip_grad_norm_, parallelize
from moecpt.train.optim import build_optimizer

CONFIG = MixtralConfig.from_preset("tiny", vocab_size=256, hidden_size=32, intermediate_size=48,
                                   num_attention_heads=4, num_key_value_heads=2)  # 4 experts, top-2


def config(num_experts: int) -> MixtralConfig:
    """With 2 experts on 4 ranks, FSDP shards the expert and router weights on their largest dim, not dim 0."""
    return dataclasses.replace(CONFIG, num_local_experts=num_experts)


def forced_route(self: Router, x_TH: torch.Tensor):
    """Every token to experts 0 and 1 (weights from the real router probabilities, so the router learns)."""
    logits_TE = F.linear(x_TH.float(), self.weight.float())
    experts_TK = torch.tensor([0, 1], device=x_TH.device).expand(x_TH.shape[0], 2)
    scores_TE = logits_TE.softmax(-1)
    weights_TK = scores_TE.gather(1, experts_TK)
    return logits_TE, scores_TE, weights_TK / weights_TK.sum(-1, keepdim=True), experts_TK


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    out_dir = Path(sys.argv[1])
    cfg = config(int(sys.argv[2]) if len(sys.argv) > 2 else CONFIG.num_local_experts)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    Router.forward = forced_route
    gen = torch.Generator().manual_seed(0)
    tokens_all = torch.randint(0, cfg.vocab_size, (world * 2, 17), generator=gen)
    mine = tokens_all[rank * 2:(rank + 1) * 2]
    n_global = tokens_all[:, 1:].numel()

    ref = MixtralForCausalLM(cfg)
    ref.init_weights(torch.Generator().manual_seed(3))
    out = ref(tokens_all[:, :-1], targets=tokens_all[:, 1:])
    (out.token_loss.sum() / n_global).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ref_counts = out.expert_counts

    result = {"rank": rank}
    for ep in [e for e in (1, 2, 4) if world % e == 0 and cfg.num_local_experts % e == 0]:
        with torch.device("meta"):
            model = MixtralForCausalLM(cfg)
        parallelize(model, ParallelSection(expert_parallel=ep), torch.device("cpu"), world, None)
        model.to_empty(device="cpu")
        model.init_weights(torch.Generator().manual_seed(3))
        opt = build_optimizer(model, OptimizerSection(lr=1e-3), torch.device("cpu"))
        for _ in range(2):  # twice: the collectives of a second step must line up as well
            opt.zero_grad(set_to_none=True)
            o = model(mine[:, :-1], targets=mine[:, 1:])
            (o.token_loss.sum() * world / n_global).backward()
        counts = o.expert_counts.clone()
        dist.all_reduce(counts)
        loss_err = (o.token_loss - out.token_loss[rank * 2:(rank + 1) * 2]).abs().max().item()
        grad_err = max((full(p.grad) - ref_grads[n]).abs().max().item() for n, p in model.named_parameters())
        norm = clip_grad_norm_(model.parameters(), 1e9).item()
        ref_norm = torch.stack([g.double().pow(2).sum() for g in ref_grads.values()]).sum().sqrt().item()
        opt.step()

        def local_bytes(ts):
            return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in ts)

        state = [v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
        # A sharded DCP checkpoint and the full weights it must load to on one process.
        dcp.save(get_model_state_dict(model), checkpoint_id=str(out_dir / f"dcp_ep{ep}"))
        full_weights = {n: full(p).detach().clone() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(full_weights, out_dir / f"full_ep{ep}.pt")
        placements = sorted({str(p.placements) for p in model.parameters()})
        result[f"ep{ep}"] = {
            "loss_err": loss_err, "grad_err": grad_err, "norm": norm, "ref_norm": ref_norm,
            "counts_equal": bool(torch.equal(counts, ref_counts)), "idle_experts": int((counts == 0).sum()),
            "param_bytes": local_bytes(model.parameters()),
            "grad_bytes": local_bytes(p.grad for p in model.parameters()),
            "optim_bytes": local_bytes(state), "placements": placements,
        }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
