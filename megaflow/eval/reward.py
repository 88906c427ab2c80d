"""Reward-model evaluation: accuracy on preference pairs, and rewards of given responses.

    accuracy = mean_i 1[r(x, y_chosen,i) > r(x, y_rejected,i)]      (a tie counts as wrong, as in TRL)
    margin   = mean_i (r(x, y_chosen,i) - r(x, y_rejected,i))

with r the reward model's value at the last token of the chat-rendered prompt and response
(megaflow.inference.reward). The pairs are read and rendered as the rm stage read its training data:
the same record formats and the checkpoint's own `data.preference` settings (chat template included).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaflow.errors import UserError


def _options(ckpt: str, seq_length: int):
    """The checkpoint's own `data.preference` settings (chat template included)."""
    from megaflow.data.preference import PreferenceDataOptions
    from megaflow.models.weights import stored_config

    data = stored_config(ckpt).data
    return PreferenceDataOptions.from_config(data.preference, seq_length=data.seq_length)


def _template(model, opts):
    from megaflow.data.chat import ChatTemplate, chat_tokenizer

    tokenizer, source, _ = chat_tokenizer(model.tokenizer, opts.chat_template)
    return ChatTemplate(tokenizer, source)


def reward_template(ckpt: str, model):
    """The chat template a reward model was trained with (its checkpoint's `data.preference`): the one
    its responses must be scored in."""
    return _template(model, _options(ckpt, model.max_sequence_length))


def evaluate_reward_accuracy(ckpt: str, data: str, batch_size: int = 16, limit: int | None = None) -> dict:
    """`megaflow eval RM_CKPT --metrics reward_acc --data PAIRS`: accuracy, mean margin, reward distribution."""
    from megaflow.data.preference import load_pairs, tokenize_pairs
    from megaflow.inference import load_for_inference
    from megaflow.inference.reward import rewards
    from megaflow.eval.compare import reward_metrics

    if not Path(data).exists():
        raise UserError(f"--data: file not found: {data}")
    model = load_for_inference(ckpt)
    opts = _options(ckpt, model.max_sequence_length)
    pairs = load_pairs([data], opts)
    samples = tokenize_pairs(pairs[:limit] if limit else pairs, _template(model, opts), opts, source=f"--data {data}")
    r_c = torch.tensor(rewards(model, [s.chosen_ids for s in samples], batch_size))
    r_r = torch.tensor(rewards(model, [s.rejected_ids for s in samples], batch_size))
    metrics = {k.replace("reward/", "reward_"): float(v) for k, v in reward_metrics(r_c, r_r).items()}
    return {"reward_accuracy": metrics.pop("accuracy"), "reward_margin": metrics.pop("margin"),
            "reward_pairs": len(samples)} | metrics


def score_responses(ckpt: str, prompt: str, responses: list[str], system: str | None = None) -> list[float]:
    """`megaflow score RM_CKPT --prompt P --response R ...`: the reward of each response to one user turn."""
    from megaflow.data.preference import encode_response
    from megaflow.inference import load_for_inference
    from megaflow.inference.reward import rewards

    if not responses:
        raise UserError("--response: give at least one response to score")
    model = load_for_inference(ckpt)
    template = reward_template(ckpt, model)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return rewards(model, [encode_response(template, messages, r)[0] for r in responses])


def pair_scorer(ckpt: str):
    """score(prompts, responses) -> the reward model's reward of each (user prompt, response) pair; the
    model is loaded once (the safety evaluation's harmlessness judge)."""
    from megaflow.data.preference import encode_response
    from megaflow.inference import load_for_inference
    from megaflow.inference.reward import rewards

    model = load_for_inference(ckpt)
    template = reward_template(ckpt, model)

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        return rewards(model, [encode_response(template, [{"role": "user", "content": p}], r)[0]
                               for p, r in zip(prompts, responses)])

    return score
