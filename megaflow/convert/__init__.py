"""Hugging Face <-> megaflow conversion (docs/convert.md).

    hf_config.py       config.json <-> ModelConfig (pure Python: bad input fails before torch is imported)
    families.py        one adapter per architecture family: HF tensor names <-> megatron parameters
    safetensors_io.py  sharded safetensors in (shard by shard) and out (planned shards + index)
    mcore.py           the megatron side: a one-process TP=1 model, its parameters, its logits
    verify.py          parity check against transformers
    convert.py         hf_to_megaflow / megaflow_to_hf
"""

from __future__ import annotations


def hf_to_megaflow(*args, **kwargs):
    from megaflow.convert.convert import hf_to_megaflow as run

    return run(*args, **kwargs)


def megaflow_to_hf(*args, **kwargs):
    from megaflow.convert.convert import megaflow_to_hf as run

    return run(*args, **kwargs)
