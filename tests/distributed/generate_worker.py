"""Worker for tests/distributed/test_generate_parallel.py: generation and scoring of one checkpoint in one
parallel layout after another, in one world of 2 ranks.

    torchrun --nproc-per-node 2 tests/distributed/generate_worker.py --ckpt CKPT --out results.json

Layouts: `single` (tp=1 pp=1: each rank runs the whole model on its own, exactly as one process does, and
is the reference), `tp2`, `pp2`, and `tp2-sp-chunks` (chunks built with sequence parallelism, as a
Trainer would hold them, wrapped with InferenceModel.from_chunks). Each rank records what it got, so the
test also sees that every rank of a model replica returns the same completions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "KING"]
LAYOUTS = {"single": (1, 1, False), "tp2": (2, 1, False), "pp2": (1, 2, False), "tp2-sp-chunks": (2, 1, True)}


def build(ckpt: str, tp: int, pp: int, sp: bool):
    from megatron.core import parallel_state

    from megaflow.inference import InferenceModel, load_for_inference

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not sp:
        return load_for_inference(ckpt, tp=tp, pp=pp)
    # What PPO does: generate with chunks a Trainer built (here with sequence parallelism on).
    from megaflow.config.schema import ModelConfig, ParallelConfig
    from megaflow.data.tokenizer import Tokenizer
    from megaflow.models import gpt
    from megaflow.models import weights
    from megaflow.runtime import distributed as dist

    meta = weights.read_meta(ckpt)
    model_cfg = ModelConfig.model_validate(meta["model"])
    parallel = ParallelConfig(tp=tp, pp=pp, sp=True)
    dist.setup(tp=tp, pp=pp)
    tcfg = gpt.transformer_config(model_cfg, parallel)
    chunks = gpt.build_gpt_chunks(model_cfg, tcfg, meta["padded_vocab_size"])
    weights.load_weights(ckpt, chunks)
    for chunk in chunks:
        chunk.train()  # as in the middle of training: inference must switch to eval and back
    model = InferenceModel.from_chunks(chunks, Tokenizer.load(Path(ckpt) / "tokenizer"))
    assert model.config.sequence_parallel
    return model


def layout_facts(model) -> dict:
    """What this rank really holds: group sizes, its pipeline stage's part of the model, its vocab shard."""
    from megatron.core import parallel_state as ps

    from megaflow.models.gpt import unwrap

    inner = unwrap(model.chunks[0])
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "layers": len(inner.decoder.layers),
        "first": model.is_first_stage,
        "last": model.is_last_stage,
        "output_rows": inner.output_layer.weight.shape[0] if model.is_last_stage else 0,
    }


def run_layout(ckpt: str, tp: int, pp: int, sp: bool) -> dict:
    from megaflow.inference import SamplingParams, generate, logprobs_of, score

    model = build(ckpt, tp, pp, sp)
    greedy = SamplingParams(max_new_tokens=16, greedy=True, stop_token_ids=[])
    cached = generate(model, PROMPTS, greedy)
    uncached = generate(model, PROMPTS, greedy, use_cache=False)
    sampled = generate(model, PROMPTS, SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, seed=11,
                                                      stop_token_ids=[]))
    scores = score(model, [c.prompt_ids for c in cached], [c.token_ids for c in cached])
    full = logprobs_of(model, [c.prompt_ids + c.token_ids for c in cached])
    sampled_full = logprobs_of(model, [c.prompt_ids + c.token_ids for c in sampled])
    result = {
        "greedy": [c.token_ids for c in cached],
        "text": [c.text for c in cached],
        "uncached": [c.token_ids for c in uncached],
        "decode_logprobs": [c.logprobs for c in cached],
        "score_logprobs": [s.logprobs for s in scores],
        "is_greedy": [s.is_greedy for s in scores],
        "full_logprobs": [f.tolist() for f in full],
        "sampled": [c.token_ids for c in sampled],
        # the KV-cache decode's log-probs of the sampled tokens, and the training forward's of the same
        "sampled_logprobs": [c.logprobs for c in sampled],
        "sampled_full": [f[len(c.prompt_ids) - 1:].tolist() for f, c in zip(sampled_full, sampled)],
        "facts": layout_facts(model),
    }
    if sp:
        result["restored"] = bool(model.config.sequence_parallel) and all(c.training for c in model.chunks)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    args = ap.parse_args()
    from megaflow.runtime import distributed as dist

    results = {}
    for name in args.layouts:
        mine = run_layout(args.ckpt, *LAYOUTS[name])
        per_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(per_rank, mine)
        results[name] = per_rank
    if dist.is_rank0():
        args.out.write_text(json.dumps(results))
    dist.teardown()


if __name__ == "__main__":
    main()
