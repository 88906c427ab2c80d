"""Generation, scoring, `megaflow generate` and `megaflow chat` on the tiny pretrained checkpoint.

The in-process checks run in one subprocess (this file run as a script, `python tests/e2e/test_generate.py
CKPT OUT`): loading megatron once is most of the cost, and the CPU layer must not enter pytest's process.
It writes what it measured to JSON; the tests below assert on it. Two more subprocesses run the CLI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "KING", "What is thy name?"]
CLI_PROMPTS = ["ROMEO:", "KING"]
CHAT_TURNS = ["hello", "how are you?"]
TOL = 1e-5


# --- the in-process checks (run as a script) ---------------------------------------------------------


def _training_forward_logprobs(model, ids: list[int]) -> list[float]:
    """Per-token log-probs of ids[1:] from the training forward: LanguageModelTask.forward_step (the
    hooks pretraining runs through megatron's schedule) on one unpadded sample; log-prob = -CE."""
    import torch

    from megaflow.training.lm import LanguageModelTask

    seq = torch.tensor([ids])
    batch = {"tokens": seq[:, :-1], "labels": seq[:, 1:], "loss_mask": torch.ones(1, len(ids) - 1)}
    with torch.no_grad():
        per_token_ce, _ = LanguageModelTask().forward_step(iter([batch]), model.chunks[0])
    return (-per_token_ce[0]).tolist()


def _max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def run_checks(ckpt: str) -> dict:
    from megaflow.errors import UserError
    from megaflow.inference import SamplingParams, generate, load_for_inference, logprobs_of, score
    from megaflow.inference.chat import ChatSession

    model = load_for_inference(ckpt)
    tok = model.tokenizer
    r: dict = {"vocab": model.vocab_size, "padded_vocab": model.padded_vocab_size,
               "prompt_lengths": [len(tok.encode(p)) for p in PROMPTS]}

    # cached == uncached, greedy and seeded sampling, on a batch of prompts of different lengths
    greedy = SamplingParams(max_new_tokens=24, greedy=True, stop_token_ids=[])
    cached, uncached = generate(model, PROMPTS, greedy), generate(model, PROMPTS, greedy, use_cache=False)
    sampling = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7, stop_token_ids=[])
    s_cached, s_uncached = generate(model, PROMPTS, sampling), generate(model, PROMPTS, sampling, use_cache=False)
    r["greedy"] = [c.token_ids for c in cached]
    r["greedy_uncached"] = [c.token_ids for c in uncached]
    r["sampled"] = [c.token_ids for c in s_cached]
    r["sampled_uncached"] = [c.token_ids for c in s_uncached]
    r["cache_logprob_diff"] = max(_max_diff(a.logprobs, b.logprobs) for a, b in zip(s_cached, s_uncached))

    # scoring == the training forward; the decode's log-probs too
    train_lp = [_training_forward_logprobs(model, c.prompt_ids + c.token_ids) for c in s_cached]
    scores = score(model, [c.prompt_ids for c in s_cached], [c.token_ids for c in s_cached])
    full = logprobs_of(model, [c.prompt_ids + c.token_ids for c in s_cached])
    r["score_vs_training"] = max(_max_diff(s.logprobs, t[len(c.prompt_ids) - 1:])
                                 for s, t, c in zip(scores, train_lp, s_cached))
    r["logprobs_of_vs_training"] = max(_max_diff(f.tolist(), t) for f, t in zip(full, train_lp))
    r["decode_vs_training"] = max(_max_diff(c.logprobs, t[len(c.prompt_ids) - 1:]) for c, t in zip(s_cached, train_lp))
    r["score_sum_ok"] = all(abs(s.sum - sum(s.logprobs)) < 1e-9 for s in scores)
    r["score_count"] = [len(s.logprobs) for s in scores]
    # lm-eval's is_greedy: the greedy continuation is, a sampled one (that differs from greedy) is not
    g_scores = score(model, [c.prompt_ids for c in cached], [c.token_ids for c in cached])
    r["greedy_is_greedy"] = [s.is_greedy for s in g_scores]
    r["sampled_is_greedy"] = [s.is_greedy for s in scores]
    r["text_scoring"] = score(model, ["ROMEO:"], [" and"])[0].logprobs
    r["empty_prompt_scoring"] = len(score(model, [""], ["ROMEO"])[0].logprobs)

    # sampling controls
    again = generate(model, PROMPTS, sampling)
    other = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, seed=8, stop_token_ids=[]))
    top_k1 = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.5, top_k=1, seed=3, stop_token_ids=[]))
    top_p0 = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.5, top_p=1e-6, seed=3, stop_token_ids=[]))
    r["sampled_again"] = [c.token_ids for c in again]
    r["sampled_other_seed"] = [c.token_ids for c in other]
    r["top_k1"] = [c.token_ids for c in top_k1]
    r["top_p_tiny"] = [c.token_ids for c in top_p0]

    # stops: a stop token chosen from row 0's sampled tokens; a stop string from row 0's sampled text
    stop_token = s_cached[0].token_ids[5]
    by_token = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.0, seed=7, stop_token_ids=[stop_token]))
    r["stop_token"] = stop_token
    r["by_token"] = [c.to_dict() for c in by_token]
    text0 = s_cached[0].text
    stop_string = text0[len(text0) // 2: len(text0) // 2 + 3]
    by_string = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.0, seed=7,
                                                        stop_token_ids=[], stop_strings=[stop_string]))
    r["sampled_text"] = [c.text for c in s_cached]
    r["stop_string"] = stop_string
    r["by_string"] = [c.to_dict() for c in by_string]
    short = generate(model, PROMPTS, SamplingParams(max_new_tokens=3, greedy=True, stop_token_ids=[]))
    r["short"] = [c.to_dict() for c in short]

    # streaming: deltas arrive token by token and add up to the final text (a stop string held back)
    deltas: dict[int, list[str]] = {}
    streamed = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.0, seed=7,
                                                       stop_token_ids=[], stop_strings=[stop_string]),
                        on_text=lambda i, d: deltas.setdefault(i, []).append(d))
    r["stream_deltas"] = [deltas.get(i, []) for i in range(len(PROMPTS))]
    r["stream_texts"] = [c.text for c in streamed]

    # what the CLI runs, for the CLI tests to compare with
    r["cli_generate"] = [c.to_dict() for c in generate(model, CLI_PROMPTS, SamplingParams(max_new_tokens=8, greedy=True))]
    chat = ChatSession(model, SamplingParams(max_new_tokens=8, greedy=True))
    r["chat_answers"] = [chat.send(turn).text for turn in CHAT_TURNS]
    r["chat_messages"] = chat.messages
    r["chat_second_prompt"] = tok.decode(chat.prompt_ids())

    # PPO's case: generate with the chunks a Trainer holds (DDP-wrapped, in training mode), sharing weights
    r |= _trainer_chunks_checks(ckpt, model, greedy)
    # GPT-2 style learned absolute positions: the KV-cache decode passes each step's position ids
    r["learned_positions_decode_vs_forward"] = _learned_positions_check()

    try:
        generate(model, ["x " * 400], greedy)
        r["too_long_error"] = None
    except UserError as e:
        r["too_long_error"] = str(e)
    return r


def _trainer_chunks_checks(ckpt: str, model, greedy) -> dict:
    import tempfile

    from megaflow.config.loader import validate
    from megaflow.inference import InferenceModel, generate
    from megaflow.training.engine import Trainer
    from megaflow.training.lm import LanguageModelTask

    raw = dict(model.meta["config"])
    raw["run"] = {**raw["run"], "tensorboard": False, "progress": False}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(validate(raw), LanguageModelTask(), model.padded_vocab_size, Path(tmp))
        trainer.init_weights_from(ckpt)
        policy = InferenceModel.from_chunks(trainer.model, model.tokenizer)
        out = generate(policy, PROMPTS, greedy)
        trainer.close()
    return {"trainer_greedy": [c.token_ids for c in out], "trainer_mode_restored": all(c.training for c in trainer.model)}


def _learned_positions_check() -> float:
    """A randomly initialised GPT-2 style model (learned positions, LayerNorm, GELU, biases): the KV-cache
    decode's log-probs of sampled tokens equal the training forward's."""
    from megaflow.config.schema import ModelConfig, ParallelConfig
    from megaflow.inference import InferenceModel, SamplingParams, generate, logprobs_of
    from megaflow.models import gpt

    cfg = ModelConfig(family="gpt2", vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4,
                      ffn_hidden_size=128, max_position_embeddings=64, position_embedding="learned",
                      normalization="LayerNorm", activation="gelu", add_bias_linear=True, init_method_std=0.2)
    tcfg = gpt.transformer_config(cfg, ParallelConfig())
    model = InferenceModel.from_chunks(gpt.build_gpt_chunks(cfg, tcfg, 256), None, vocab_size=250)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
    out = generate(model, prompts, SamplingParams(max_new_tokens=20, seed=1, stop_token_ids=[]))
    full = logprobs_of(model, [c.prompt_ids + c.token_ids for c in out])
    assert all(t < 250 for c in out for t in c.token_ids)
    return max(_max_diff(c.logprobs, f[len(c.prompt_ids) - 1:].tolist()) for c, f in zip(out, full))


# --- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tiny_pretrain) -> Path:
    return tiny_pretrain / "final"


def _env() -> dict:
    from tests.conftest import REPO

    return {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def checks(ckpt, tmp_path_factory) -> dict:
    from tests.conftest import run_python

    out = tmp_path_factory.mktemp("generate") / "checks.json"
    proc = run_python(__file__, str(ckpt), str(out), env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_prompts_differ_in_length(checks):
    lengths = checks["prompt_lengths"]
    assert len(set(lengths)) == len(lengths) and min(lengths) < max(lengths) / 4


def test_cached_equals_uncached(checks):
    assert checks["greedy"] == checks["greedy_uncached"]
    assert checks["sampled"] == checks["sampled_uncached"]
    assert all(len(t) == 24 for t in checks["greedy"] + checks["sampled"])
    assert checks["cache_logprob_diff"] < TOL


def test_scoring_equals_training_forward(checks):
    print({k: checks[k] for k in ("score_vs_training", "logprobs_of_vs_training", "decode_vs_training")})
    assert checks["score_vs_training"] < TOL
    assert checks["logprobs_of_vs_training"] < TOL
    assert checks["decode_vs_training"] < TOL  # the KV-cache decode's log-probs too
    assert checks["score_sum_ok"] and checks["score_count"] == [24] * len(PROMPTS)
    assert all(lp < 0 for lp in checks["text_scoring"]) and checks["empty_prompt_scoring"] >= 1


def test_is_greedy_flag(checks):
    assert all(checks["greedy_is_greedy"])
    differs = [s != g for s, g in zip(checks["sampled"], checks["greedy"])]
    assert any(differs)
    assert [not flag for flag in checks["sampled_is_greedy"]] == differs


def test_sampling_controls(checks):
    assert checks["sampled_again"] == checks["sampled"]  # same seed, same tokens
    assert checks["sampled_other_seed"] != checks["sampled"]
    assert checks["sampled"] != checks["greedy"]
    assert checks["top_k1"] == checks["greedy"]  # top-k=1 is greedy, whatever the temperature
    assert checks["top_p_tiny"] == checks["greedy"]
    assert all(t < checks["vocab"] for row in checks["sampled"] for t in row)  # never a padding id


def test_stop_token_per_sequence(checks):
    stop = checks["stop_token"]
    for row, sampled in zip(checks["by_token"], checks["sampled"]):
        if stop in sampled:  # stops at its first occurrence, the stop token kept in the ids, not the text
            cut = sampled.index(stop) + 1
            assert row["token_ids"] == sampled[:cut] and row["finish_reason"] == "stop" and row["stop"] == stop
            assert len(row["logprobs"]) == cut
        else:  # the other rows of the batch run on unaffected
            assert row["token_ids"] == sampled and row["finish_reason"] == "length"
    assert checks["by_token"][0]["finish_reason"] == "stop"


def test_stop_string(checks):
    s = checks["stop_string"]
    assert len(s) == 3
    for row, text, sampled in zip(checks["by_string"], checks["sampled_text"], checks["sampled"]):
        if s in text:
            assert row["finish_reason"] == "stop" and row["stop"] == s
            assert row["text"] == text[: text.index(s)]
            assert row["token_ids"] == sampled[: len(row["token_ids"])] and len(row["token_ids"]) < 24
        else:
            assert row["finish_reason"] == "length" and row["token_ids"] == sampled
    assert checks["by_string"][0]["finish_reason"] == "stop"


def test_max_new_tokens(checks):
    for row, greedy in zip(checks["short"], checks["greedy"]):
        assert row["token_ids"] == greedy[:3] and row["finish_reason"] == "length"


def test_streaming(checks):
    for deltas, text in zip(checks["stream_deltas"], checks["stream_texts"]):
        assert "".join(deltas) == text
    assert max(len(d) for d in checks["stream_deltas"]) > 3  # token by token, not at the end


def test_chat_session_keeps_the_conversation(checks):
    messages = checks["chat_messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages[::2]] == CHAT_TURNS
    assert [m["content"] for m in messages[1::2]] == checks["chat_answers"]
    prompt = checks["chat_second_prompt"]  # the template applied to the whole conversation
    assert prompt.index("hello") < prompt.index(checks["chat_answers"][0]) < prompt.index("how are you?")
    assert "<|assistant|>" in prompt and "<|end_of_turn|>" in prompt


def test_generation_with_a_trainers_chunks(checks):
    """InferenceModel.from_chunks(trainer.model): same tokens as the loaded model; training mode restored."""
    assert checks["trainer_greedy"] == checks["greedy"]
    assert checks["trainer_mode_restored"]


def test_learned_positions_kv_cache(checks):
    assert checks["learned_positions_decode_vs_forward"] < TOL


def test_too_long_prompt_is_one_line_error(checks):
    assert "the model's context is 256" in checks["too_long_error"]


def _megaflow(*args, stdin: str | None = None):
    from tests.conftest import run_python

    return run_python("-m", "megaflow", *args, env=_env(), input=stdin)


def test_cli_generate_json(ckpt, checks):
    args = ["generate", str(ckpt), "--max-new-tokens", "8", "--greedy", "--json"]
    for p in CLI_PROMPTS:
        args += ["--prompt", p]
    proc = _megaflow(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # one JSON object and nothing else on stdout
    assert [c["prompt"] for c in out["completions"]] == CLI_PROMPTS
    for got, want in zip(out["completions"], checks["cli_generate"]):
        assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
        assert len(got["logprobs"]) == len(got["token_ids"]) and got["finish_reason"] in ("stop", "length")
    assert out["params"]["greedy"] is True and out["params"]["max_new_tokens"] == 8


def test_cli_chat_streams_keeps_and_resets(ckpt, checks):
    a1, a2 = checks["chat_answers"]
    proc = _megaflow("chat", str(ckpt), "--max-new-tokens", "8", "--greedy",
                     stdin="hello\nhow are you?\n/reset\nhello\n")  # then end of input
    assert proc.returncode == 0, proc.stderr[-3000:]
    # answers on stdout (each ends with a newline); after /reset the first answer comes again
    assert proc.stdout == f"{a1}\n{a2}\n{a1}\n"
    assert "(new conversation)" in proc.stderr and proc.stderr.count("user> ") == 5


def test_cli_chat_refuses_one_message_and_goes_on(ckpt, checks):
    a1, _ = checks["chat_answers"]
    proc = _megaflow("chat", str(ckpt), "--max-new-tokens", "8", "--greedy",
                     stdin="word " * 400 + "\nhello\n")  # longer than the context, then what answers a1
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"{a1}\n"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megaflow: error:")]
    assert len(errors) == 1 and "the message is too long" in errors[0], proc.stderr[-2000:]


def test_cli_bad_sampling_values_and_undecodable_prompts(ckpt):
    proc = _megaflow("generate", str(ckpt), "--prompt", "x", "--temperature", "nan")
    assert proc.returncode == 2 and "temperature must be a finite number" in proc.stderr, proc.stderr[-2000:]
    proc = _megaflow("generate", str(ckpt), "--prompt", "To be \udcff or", "--max-new-tokens", "2", "--greedy")
    assert proc.returncode == 0, proc.stderr[-2000:]  # a byte that is not UTF-8 in argv: U+FFFD, as in files


def test_cli_errors_are_one_line(tmp_path):
    proc = _megaflow("generate", str(tmp_path), "--prompt", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not a megaflow checkpoint" in proc.stderr


if __name__ == "__main__":
    result = run_checks(sys.argv[1])
    Path(sys.argv[2]).write_text(json.dumps(result))
