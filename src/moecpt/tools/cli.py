"""`moecpt upcycle` and `moecpt merge`."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    u = subparsers.add_parser(
        "upcycle", help="turn a dense Llama/Mistral/Qwen3 model into an MoE that computes the same function",
        description="Upcycle a dense Hugging Face model into a Mixtral (from llama or mistral) or Qwen3-MoE (from "
                    "qwen3) directory: every expert a copy of the dense MLP (--granularity 1) or a 1/G slice of "
                    "it in virtual groups with weight scaling (arXiv 2410.07524), a small random router, "
                    "attention, norms and embeddings copied. At initialisation the logits equal the dense "
                    "model's; combinations with no exact initialisation are refused with the reason.")
    u.add_argument("dense_dir")
    u.add_argument("out_dir")
    u.add_argument("--family", choices=["mixtral", "qwen3_moe"], default="mixtral")
    u.add_argument("--experts", type=int, required=True, help="experts per MoE layer (E)")
    u.add_argument("--top-k", type=int, required=True, help="experts per token (K)")
    u.add_argument("--granularity", type=int, default=1,
                   help="G: each expert is 1/G of the dense MLP (1: copies); K and E must allow whole groups")
    u.add_argument("--shared-experts", type=int, default=0,
                   help="shared experts (neither mixtral nor qwen3_moe has them: only 0 is accepted)")
    u.add_argument("--seed", type=int, default=0, help="seed of the router's random initialisation")
    u.add_argument("--router-std", type=float, default=None,
                   help="std of the router's initialisation (default: the dense initializer_range)")
    u.add_argument("--no-norm-topk-prob", dest="norm_topk_prob", action="store_false",
                   help="qwen3_moe: top-k weights not renormalised (exact only with --top-k equal to --experts)")
    u.set_defaults(func=_upcycle)

    m = subparsers.add_parser(
        "merge", help="average checkpoints, or add a task (chat) vector",
        description="Merge models of one family into a Hugging Face directory: --average X Y ... (uniform, or "
                    "--weights), or --task-vector BASE --plus A --minus B [--scale s] = BASE + s (A - B). Inputs: "
                    "Hugging Face directories, moecpt checkpoints or run directories. Exact in float64, rounded "
                    "once to float32.")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--average", nargs="+", metavar="MODEL", help="models to average")
    m.add_argument("--weights", nargs="+", type=float, help="one weight per --average model (normalised)")
    m.add_argument("--task-vector", metavar="BASE", help="the model the vector is added to")
    m.add_argument("--plus", metavar="A")
    m.add_argument("--minus", metavar="B")
    m.add_argument("--scale", type=float, default=1.0)
    m.add_argument("--embeddings", choices=["merge", "shared_rows", "skip"], default="merge",
                   help="embedding and LM head: merged like the rest (default), merged on the rows every input "
                        "has (shared vocabulary), or taken from the first/base model")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written weights (default float32)")
    m.set_defaults(func=_merge)


def _upcycle(args: argparse.Namespace) -> int:
    from moecpt.tools.upcycle import upcycle

    out = upcycle(args.dense_dir, args.out_dir, family=args.family, experts=args.experts, top_k=args.top_k,
                  granularity=args.granularity, shared_experts=args.shared_experts, seed=args.seed,
                  router_std=args.router_std, norm_topk_prob=args.norm_topk_prob)
    print(json.dumps({"upcycled": str(out), "family": args.family, "experts": args.experts, "top_k": args.top_k,
                      "granularity": args.granularity}))
    return 0


def _merge(args: argparse.Namespace) -> int:
    import torch

    from moecpt.errors import UserError
    from moecpt.tools.merge import TaskVector, merge

    tv = None
    if args.task_vector or args.plus or args.minus:
        if not (args.task_vector and args.plus and args.minus):
            raise UserError("merge: a task vector needs --task-vector BASE, --plus A and --minus B")
        tv = TaskVector(args.task_vector, args.plus, args.minus, args.scale)
    if args.weights and not args.average:
        raise UserError("merge: --weights go with --average")
    out = merge(args.out, average=args.average, weights=args.weights, task_vector=tv, embeddings=args.embeddings,
                dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(json.dumps({"merged": str(out)}))
    return 0
