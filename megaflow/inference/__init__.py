"""KV-cache generation, rollouts and log-prob scoring.

    from megaflow.inference import load_for_inference, SamplingParams, generate, score

    model = load_for_inference("runs/tiny/sft/final")                 # or InferenceModel.from_chunks(...)
    outs = generate(model, ["To be, or not"], SamplingParams(max_new_tokens=32, temperature=0.8, seed=1))
    scores = score(model, ["The capital of France is"], [" Paris"])    # log-probs, sum, is_greedy

docs/inference.md describes the API for later stages (PPO/GRPO rollouts, DPO/RM scoring, lm-eval).
"""

from megaflow.inference.generate import Completion, SamplingParams, default_stop_ids, generate, sample_next
from megaflow.inference.model import InferenceModel, load_for_inference
from megaflow.inference.scoring import Score, logprobs_of, score

__all__ = ["Completion", "InferenceModel", "SamplingParams", "Score", "default_stop_ids", "generate",
           "load_for_inference", "logprobs_of", "sample_next", "score"]
