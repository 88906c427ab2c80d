"""Worker for tests/convert/test_convert.py (megatron's parallel state is per process, so every
conversion runs here, many per process).

    python tests/convert/worker.py --out DIR --models a b ...            # one process: convert both ways
    torchrun --nproc-per-node 2 tests/convert/worker.py --out DIR --tp2 --models a b ...

One process: for each DIR/NAME (an HF model), `hf_to_megaflow` (verified against transformers at 1e-4)
into DIR/NAME.mf, then `megaflow_to_hf` (verified too) into DIR/NAME.hf; the checkpoint is then loaded
afresh into a new model and its logits on DIR/NAME.tokens.pt saved as DIR/NAME.mf-logits.pt. Also the CLI
once, and the --verify gate. With --tp2: each checkpoint loaded into a TP=2 model, logits from rank 0.
Results: DIR/results-{one,tp2}.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import torch


def fresh_logits(ckpt: Path, tokens: torch.Tensor, tp: int) -> torch.Tensor:
    from megaflow.config.schema import ModelConfig, ParallelConfig
    from megaflow.convert import mcore
    from megaflow.models import gpt
    from megaflow.models import weights

    meta = weights.read_meta(ckpt)
    model = ModelConfig(**meta["model"])
    chunk = gpt.build_gpt_chunks(model, gpt.transformer_config(model, ParallelConfig(tp=tp)), meta["padded_vocab_size"])[0]
    weights.load_weights(ckpt, [chunk])
    return mcore.logits(chunk.eval(), tokens)


def one_process(out: Path, names: list[str]) -> dict:
    from megaflow import cli
    from megaflow.config.schema import ModelConfig
    from megaflow.convert import mcore, verify
    from megaflow.convert.convert import hf_to_megaflow, megaflow_to_hf
    from megaflow.errors import UserError
    from megaflow.models import weights

    results = {}
    for name in names:
        t0 = time.time()
        a = hf_to_megaflow(out / name, out / f"{name}.mf", verify=True, tolerance=1e-4)
        b = megaflow_to_hf(out / f"{name}.mf", out / f"{name}.hf", verify=True, tolerance=1e-4, max_shard_size="40KB")
        tokens = torch.load(out / f"{name}.tokens.pt")
        torch.save(fresh_logits(out / f"{name}.mf", tokens, tp=1), out / f"{name}.mf-logits.pt")
        # the padded vocabulary rows of the converted model are zeros
        meta = weights.read_meta(out / f"{name}.mf")
        chunk = mcore.build(ModelConfig(**meta["model"]), meta["padded_vocab_size"])
        weights.load_weights(out / f"{name}.mf", [chunk])
        params = mcore.parameters(chunk)
        vocab = meta["model"]["vocab_size"]
        pad_zero = all(params[k][vocab:].abs().sum().item() == 0 for k in ("embedding.word_embeddings.weight",
                                                                            "output_layer.weight") if k in params)
        results[name] = {"to_megaflow": a, "to_hf": b, "padded_rows_zero": pad_zero, "seconds": time.time() - t0}

    # a model that never was an HF one (megaflow's own tokenizer), written in bfloat16
    from megaflow.data.tokenizer import Tokenizer

    native = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                         vocab_size=300, max_position_embeddings=64, init_method_std=0.1)
    mcore.setup_one_process()
    weights.save_final(out / "native.mf", [mcore.build(native, 384, initialize=True)],
                          {"model": native.model_dump(mode="json"), "padded_vocab_size": 384, "tokenizer": "tokenizer",
                           "parents": []}, Tokenizer.load(out / "tokenizer-src"))
    results["native"] = megaflow_to_hf(out / "native.mf", out / "native.hf", verify=True, tolerance=1e-4,
                                       dtype="bfloat16")

    # the CLI, once
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(["convert", "hf-to-megaflow", "--hf", str(out / "gpt2"), "--out", str(out / "gpt2.cli"),
                       "--verify", "--tolerance", "1e-4", "--json"])
    results["cli"] = {"rc": rc, "stdout": stdout.getvalue()}

    # the --verify gate: a model that does not match fails and writes nothing
    real = verify.hf_logits
    verify.hf_logits = lambda hf_dir, tokens: real(hf_dir, tokens) + 1e-3
    gate = {}
    for direction, run in (("to_megaflow", lambda: hf_to_megaflow(out / "llama", out / "gate.mf", verify=True, tolerance=1e-4)),
                           ("to_hf", lambda: megaflow_to_hf(out / "llama.mf", out / "gate.hf", verify=True, tolerance=1e-4))):
        try:
            run()
            gate[direction] = "passed"
        except UserError as e:
            gate[direction] = str(e)
    verify.hf_logits = real
    gate["left_behind"] = sorted(p.name for p in out.iterdir() if p.name.startswith("gate"))
    results["gate"] = gate
    return results


def tp2(out: Path, names: list[str]) -> dict:
    results = {}
    for name in names:
        tokens = torch.load(out / f"{name}.tokens.pt")
        logits = fresh_logits(out / f"{name}.mf", tokens, tp=2)
        if torch.distributed.get_rank() == 0:
            torch.save(logits, out / f"{name}.tp2-logits.pt")
        from megatron.core import parallel_state

        results[name] = {"tp": parallel_state.get_tensor_model_parallel_world_size()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--tp2", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    from megaflow.runtime import distributed as dist

    if args.tp2:
        dist.setup(tp=2, seed=0)
        results = tp2(out, args.models)
        name = "tp2"
    else:
        results = one_process(out, args.models)
        name = "one"
    if dist.is_rank0():
        (out / f"results-{name}.json").write_text(json.dumps(results, indent=1, default=str))
    dist.teardown()


if __name__ == "__main__":
    main()
