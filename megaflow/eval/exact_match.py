"""Exact match by generation: greedy answers to held-out prompts, compared with the reference answers.

    exact_match = mean_i [ normalise(generate(prompt_i)) == normalise(answer_i) ]

normalise strips surrounding whitespace only: the tasks this is for have one right answer, spelled one
way. Prompts are rendered with the same chat template as training (add_generation_prompt), generation
stops at the end-of-turn / end-of-document tokens.
"""

from __future__ import annotations

from pathlib import Path

from megaflow.errors import UserError


def score_answers(predictions: list[str], references: list[str]) -> float:
    if not references:
        raise UserError("exact match: no examples")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def exact_match(model, template, examples: list[tuple[list[dict], str]], max_new_tokens: int = 64,
                batch_size: int = 16, keep: int = 5) -> dict:
    """Greedy answers of `model` (an InferenceModel) to `examples` [(prompt messages, answer)]."""
    from megaflow.inference.generate import SamplingParams, generate

    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    predictions = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        prompts = [template.prompt_ids(messages) for messages, _ in batch]
        predictions += [c.text for c in generate(model, prompts, params)]
    references = [answer for _, answer in examples]
    samples = [{"prompt": m[-1]["content"], "answer": a, "prediction": p}
               for (m, a), p in zip(examples[:keep], predictions[:keep])]
    return {"exact_match": score_answers(predictions, references), "examples": len(examples), "samples": samples}


def examples_from_file(path: str, tokenizer, opts) -> tuple[object, list[tuple[list[dict], str]]]:
    """(chat template, examples) from an SFT-format file: each record's last assistant turn is the answer."""
    from megaflow.data.chat import ChatTemplate, chat_tokenizer
    from megaflow.data.sft import load_conversations

    if not Path(path).exists():
        raise UserError(f"--data: file not found: {path}")
    tokenizer, source, _ = chat_tokenizer(tokenizer, opts.chat_template)
    conversations = load_conversations([path], opts)
    examples = [(c.messages[:-1], c.messages[-1]["content"]) for c in conversations if c.messages[-1]["role"] == "assistant"]
    if not examples:
        raise UserError(f"--data {path}: no examples (records whose last turn is the assistant's answer)")
    return ChatTemplate(tokenizer, source), examples


def evaluate_exact_match(ckpt: str, data: str, max_new_tokens: int = 64, batch_size: int = 16,
                         limit: int | None = None) -> dict:
    """`megaflow eval CKPT --metrics exact_match --data FILE`."""
    from megaflow.data.sft import SFTDataOptions
    from megaflow.inference import load_for_inference
    from megaflow.models.weights import stored_config

    opts = SFTDataOptions.from_config(stored_config(ckpt).data.sft)
    model = load_for_inference(ckpt)
    template, examples = examples_from_file(data, model.tokenizer, opts)
    return exact_match(model, template, examples[:limit] if limit else examples, max_new_tokens, batch_size)
