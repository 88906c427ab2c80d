"""Worker for tests/e2e/test_packing.py: runs packed and unpacked SFT batches through tiny megatron GPTModels
on CPU (a RoPE llama and a learned-position gpt2) and prints one JSON object of measurements.

    python tests/e2e/packing_worker.py

Runs in a process of its own because megatron's parallel_state and megaflow's CPU layer are process-global.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SEQ, VOCAB, N_SAMPLES = 48, 100, 14

FAMILIES = {
    "llama": dict(family="llama", position_embedding="rope", normalization="RMSNorm", activation="swiglu"),
    "gpt2": dict(family="gpt2", position_embedding="learned", normalization="LayerNorm", activation="gelu",
                 add_bias_linear=True, tie_embeddings=True),
}


def make_samples():
    """Random token sequences of 4..24 tokens; loss on a random suffix (an 'answer'), like SFT samples."""
    from megaflow.data.sft import Sample

    rng = np.random.default_rng(0)
    samples = []
    for i in range(N_SAMPLES):
        n = int(rng.integers(4, 25))
        ids = rng.integers(3, VOCAB, size=n)
        mask = np.zeros(n, bool)
        mask[int(rng.integers(1, n - 1)):] = True
        samples.append(Sample(f"sample {i}", ids, mask))
    return samples


def stack(dataset) -> dict[str, torch.Tensor]:
    rows = [dataset[i] for i in range(len(dataset))]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def per_sample_losses(dataset, batch, token_loss) -> dict[int, float]:
    """Mean loss over each sample's loss positions, keyed by sample index."""
    out = {}
    for r in range(len(dataset)):
        for k, j in enumerate(dataset.row_samples(r), start=1):
            where = batch["segment_ids"][r] == k
            mask = batch["loss_mask"][r][where]
            out[j] = float((token_loss[r][where].double() * mask).sum() / mask.sum())
    return out


def largest_difference(a: dict, b: dict) -> float:
    return max(abs(a[j] - b[j]) for j in a)


def check_family(name: str, samples) -> dict:
    from megaflow.config.schema import ModelConfig, ParallelConfig
    from megaflow.data.packing import block_diagonal_mask
    from megaflow.data.sft import SFTDataset
    from megaflow.models import gpt, size
    from megaflow.runtime import distributed as dist

    dist.set_seeds(7)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                      max_position_embeddings=SEQ, **FAMILIES[name])
    tcfg = gpt.transformer_config(cfg, ParallelConfig())
    model = gpt.build_gpt_chunks(cfg, tcfg, size.padded_vocab_size(VOCAB, cfg.make_vocab_size_divisible_by))[0].eval()
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)[None, None]

    packed_ds = SFTDataset(samples, SEQ, pad_id=0, packing=True)
    single_ds = SFTDataset(samples, SEQ, pad_id=0, packing=False)
    packed, single = stack(packed_ds), stack(single_ds)
    with torch.no_grad():
        def loss(batch, mask, positions=None):
            positions = batch["position_ids"] if positions is None else positions
            return model(batch["tokens"], positions, mask, labels=batch["labels"])

        def logits(tokens, positions, mask):
            return model(tokens, positions, mask)

        block = block_diagonal_mask(packed["segment_ids"])
        unpacked_losses = per_sample_losses(single_ds, single, loss(single, causal))
        packed_losses = per_sample_losses(packed_ds, packed, loss(packed, block))
        # control: the packed rows with positions counting on across samples (no restart)
        causal_packed = per_sample_losses(packed_ds, packed, loss(packed, causal))
        running = torch.arange(SEQ).expand_as(packed["tokens"])
        no_restart = per_sample_losses(packed_ds, packed, loss(packed, block, running))

        # isolation: change the first sample of a packed row; the later samples' logits must not move at all
        row = next(r for r in range(len(packed_ds)) if len(packed_ds.row_samples(r)) >= 3)
        tokens = packed["tokens"][row:row + 1]
        seg = packed["segment_ids"][row:row + 1]
        changed = tokens.clone()
        first = seg == 1
        changed[first] = (changed[first] + 1 + torch.arange(int(first.sum())) % 7) % VOCAB
        positions = packed["position_ids"][row:row + 1]
        later = (seg > 1)[0]

        def moved(mask):
            a, b = logits(tokens, positions, mask)[0], logits(changed, positions, mask)[0]
            return (torch.equal(a[later], b[later]), float((a[later] - b[later]).abs().max()),
                    float((a[first[0]] - b[first[0]]).abs().max()))

        iso_equal, iso_diff, iso_own = moved(block[row:row + 1])
        ctl_equal, ctl_diff, _ = moved(causal)
    return {
        "rows_packed": len(packed_ds), "rows_unpacked": len(single_ds),
        "samples_per_row": [len(packed_ds.row_samples(r)) for r in range(len(packed_ds))],
        "packed_vs_unpacked": largest_difference(packed_losses, unpacked_losses),
        "no_restart_vs_unpacked": largest_difference(no_restart, unpacked_losses),
        "causal_mask_vs_unpacked": largest_difference(causal_packed, unpacked_losses),
        "mean_loss": sum(unpacked_losses.values()) / len(unpacked_losses),
        "isolated_bit_identical": iso_equal, "isolated_max_diff": iso_diff, "perturbed_sample_diff": iso_own,
        "causal_control_bit_identical": ctl_equal, "causal_control_max_diff": ctl_diff,
    }


def packed_seq_params_check() -> dict:
    """The GPU builder: megatron's PackedSeqParams over the flattened micro-batch (TE itself needs a GPU)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megaflow.data.packing import packed_seq_params, to_thd

    batch = to_thd({"segment_ids": torch.tensor([[1, 1, 2, 0], [1, 1, 1, 1]]), "tokens": torch.zeros(2, 4)})
    p = packed_seq_params(batch["segment_ids"])
    return {"is_params": isinstance(p, PackedSeqParams), "format": p.qkv_format, "cu_q": p.cu_seqlens_q.tolist(),
            "cu_kv": p.cu_seqlens_kv.tolist(), "dtype": str(p.cu_seqlens_q.dtype), "max": [p.max_seqlen_q, p.max_seqlen_kv],
            "tokens_shape": list(batch["tokens"].shape)}


def main() -> None:
    from megaflow.runtime import distributed as dist

    dist.setup(tp=1, seed=7)
    samples = make_samples()
    result = {name: check_family(name, samples) for name in FAMILIES}
    result["packed_seq_params"] = packed_seq_params_check()
    dist.teardown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
