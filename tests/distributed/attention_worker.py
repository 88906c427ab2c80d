"""Worker for tests/distributed/test_attention.py: the SDPA core attention against megatron's unfused one.

For each case a model is built twice from the same weights, once per core attention
(megaflow.models.attention), and one forward and backward of the summed token loss is run on the same
batch; the loss and every parameter's gradient are compared. Cases: MHA and GQA, each with a causal
batch (no mask), packed SFT rows (block-diagonal mask) and packed DPO pairs with a shared prompt (the
pair mask and per-token RoPE positions), plus a non-default softmax scale.

    torchrun --nproc-per-node 2 tests/distributed/attention_worker.py --out DIR    # writes DIR/attention.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

VOCAB = 256
SEQ = 48
HEADS = {"mha": (4, 4), "gqa": (4, 2)}  # (attention heads, query groups)


def causal_batch(gen: torch.Generator) -> dict:
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, SEQ),
            "position_ids": torch.arange(SEQ).expand(2, SEQ), "attention_mask": None}


def packed_sft_batch(gen: torch.Generator) -> dict:
    """Rows of whole samples of random lengths then padding (megaflow.data.packing's layout)."""
    from megaflow.data.packing import block_diagonal_mask

    segments, positions = torch.zeros(2, SEQ, dtype=torch.long), torch.zeros(2, SEQ, dtype=torch.long)
    for row in range(2):
        at, k = 0, 1
        while at < SEQ - 8:
            n = int(torch.randint(4, 16, (1,), generator=gen))
            n = min(n, SEQ - 4 - at)
            segments[row, at:at + n], positions[row, at:at + n] = k, torch.arange(n)
            at, k = at + n, k + 1
    batch = causal_batch(gen)
    batch |= {"position_ids": positions, "loss_mask": (segments > 0).float(),
              "attention_mask": block_diagonal_mask(segments)}
    return batch


def packed_dpo_batch(gen: torch.Generator) -> dict:
    """Rows of preference pairs sharing their prompt (megaflow.data.pair_packing), with the pair mask."""
    from megaflow.data import pair_packing
    from megaflow.data.preference import PreferenceSample

    rows = []
    for row in range(2):
        samples = []
        for i in range(2):
            p, c, r = (int(torch.randint(2, 7, (1,), generator=gen)) for _ in range(3))
            prompt = torch.randint(0, VOCAB, (p,), generator=gen).numpy()
            chosen = np.concatenate([prompt, torch.randint(0, VOCAB, (c,), generator=gen).numpy()])
            rejected = np.concatenate([prompt, torch.randint(0, VOCAB, (r,), generator=gen).numpy()])
            samples.append(PreferenceSample(f"{row}.{i}", chosen, np.arange(len(chosen)) >= p,
                                            rejected, np.arange(len(rejected)) >= p))
        rows.append(pair_packing.build_pair_row(samples, SEQ, pad_id=0, share=True))
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in ("tokens", "labels", "loss_mask",
                                                                       "position_ids", "segment_ids", "branch_ids")}
    batch["loss_mask"] = batch["loss_mask"].float()
    batch["attention_mask"] = pair_packing.pair_mask(batch["segment_ids"], batch["branch_ids"])
    return batch


BATCHES = {"causal": causal_batch, "packed-sft": packed_sft_batch, "packed-dpo": packed_dpo_batch}


def build(heads: tuple[int, int], attention: str, tp: int, sp: bool, softmax_scale: float | None):
    from megaflow.config.schema import ModelConfig, ParallelConfig
    from megaflow.models import gpt
    from megaflow.runtime import distributed as dist

    dist.set_seeds(11)  # CPU initialisation of the full weights, then sharded: the same on every TP size
    cfg = ModelConfig(vocab_size=VOCAB, make_vocab_size_divisible_by=64, hidden_size=64, num_layers=2,
                      num_attention_heads=heads[0], num_query_groups=heads[1], ffn_hidden_size=128,
                      max_position_embeddings=SEQ)
    tcfg = gpt.transformer_config(cfg, ParallelConfig(tp=tp, sp=sp))
    tcfg.softmax_scale = softmax_scale
    return gpt.build_gpt_chunks(cfg, tcfg, VOCAB, attention=attention)[0]


def loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    from megaflow.models import gpt

    shared = "branch_ids" in batch
    with gpt.rotary_positions(model, batch["position_ids"]) if shared else _nothing():
        ce = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    loss = (ce * batch["loss_mask"]).sum()
    # The C++ engine directly, as megatron's schedules do: loss.backward() dispatches through the CPU
    # stand-in TorchFunctionMode (megaflow.runtime.cpu), and runs the backward with that mode popped.
    torch.autograd.Variable._execution_engine.run_backward(
        (loss,), (torch.ones_like(loss),), False, False, (), True, True)
    return float(loss), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def compare(tp: int = 1, sp: bool = False) -> dict:
    """{case: {loss_sdpa, loss_unfused, loss_rel_diff, grad_rel_diff, params}} for every case."""
    out = {}
    cases = [(h, b, None) for h in HEADS for b in BATCHES] + [("gqa", "causal", 0.3)]
    for heads, batch_name, scale in cases:
        batch = BATCHES[batch_name](torch.Generator().manual_seed(5))
        runs = {}
        for attention in ("sdpa", "unfused"):
            model = build(HEADS[heads], attention, tp, sp, scale)
            runs[attention] = loss_and_grads(model, batch)
        (loss_a, grads_a), (loss_b, grads_b) = runs["sdpa"], runs["unfused"]
        assert grads_a.keys() == grads_b.keys()
        worst = torch.tensor(max(float((grads_a[k] - grads_b[k]).abs().max() / grads_b[k].abs().max().clamp_min(1e-12))
                                 for k in grads_b))
        if tp > 1:  # each TP rank holds its own shards
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        worst = float(worst)
        name = f"{heads}-{batch_name}" + (f"-scale{scale}" if scale else "")
        out[name] = {"loss_sdpa": loss_a, "loss_unfused": loss_b, "loss_rel_diff": abs(loss_a - loss_b) / abs(loss_b),
                     "grad_rel_diff": worst, "params": len(grads_b),
                     "grad_norm": float(sum(g.double().square().sum() for g in grads_b.values()) ** 0.5)}
        if batch["attention_mask"] is not None:  # control: the same rows attended causally across samples
            loss_c, _ = loss_and_grads(build(HEADS[heads], "sdpa", tp, sp, scale), batch | {"attention_mask": None})
            out[name]["control_no_mask_rel_diff"] = abs(loss_c - loss_b) / abs(loss_b)
    return out


def dropout_check() -> dict:
    """attention_dropout from the config: in training the probabilities are dropped (outputs differ run to
    run and from eval mode), in eval mode nothing is."""
    from megaflow.config.schema import ModelConfig, ParallelConfig
    from megaflow.models import gpt
    from megaflow.runtime import distributed as dist

    dist.set_seeds(11)
    cfg = ModelConfig(vocab_size=VOCAB, make_vocab_size_divisible_by=64, hidden_size=64, num_layers=2,
                      num_attention_heads=4, ffn_hidden_size=128, max_position_embeddings=SEQ, attention_dropout=0.5)
    model = gpt.build_gpt_chunks(cfg, gpt.transformer_config(cfg, ParallelConfig()), VOCAB, attention="sdpa")[0]
    batch = causal_batch(torch.Generator().manual_seed(5))
    with torch.no_grad():
        def run():
            return model(batch["tokens"], batch["position_ids"], None)

        train_a, train_b = run(), run()
        model.eval()
        eval_a, eval_b = run(), run()
    return {"train_runs_differ": not torch.equal(train_a, train_b), "eval_runs_equal": torch.equal(eval_a, eval_b),
            "train_differs_from_eval": not torch.equal(train_a, eval_a)}


def main() -> None:
    """On 2 ranks: first each rank alone (TP1, the rank-0 results kept), then TP2 and TP2 + SP."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()

    from megatron.core import parallel_state

    from megaflow.runtime import distributed as dist

    env = dist.setup(tp=1, seed=11)
    try:
        results = {"tp1": compare(), "dropout": dropout_check()}
        parallel_state.destroy_model_parallel()
        dist.setup(tp=env.world_size, seed=11)
        results[f"tp{env.world_size}"] = compare(env.world_size, sp=False)
        results[f"tp{env.world_size}-sp"] = compare(env.world_size, sp=True)
        if env.rank == 0:
            (a.out / "attention.json").write_text(json.dumps(results, indent=1))
    finally:
        dist.teardown()


if __name__ == "__main__":
    main()
