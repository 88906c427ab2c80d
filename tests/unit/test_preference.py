"""Preference data: record formats (TRL prompt/chosen/rejected, HH-RLHF transcripts, conversation lists),
validation with FILE:LINE, the HH split on hand-written transcripts, response masks token by token,
truncation, the [2m, s] chosen-then-rejected batch layout and its log-probs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megaflow.data import preference as pref
from megaflow.data.chat import ChatTemplate
from megaflow.data.sampler import MicroBatches
from megaflow.data.tokenizer import CHAT_TEMPLATE, Tokenizer, train_tokenizer
from megaflow.errors import DataError, UserError
from megaflow.algorithms.losses import sequence_logps

U, A = "user", "assistant"


def pairs(dataset, *args, **kwargs) -> MicroBatches:
    """Micro-batches of pairs as the preference stages draw them: shuffled, chosen rows then rejected."""
    return MicroBatches(dataset, *args, shuffle=True, collate=pref.collate_pairs, **kwargs)


def msg(role, content):
    return {"role": role, "content": content}


def write_jsonl(path: Path, records) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


# --- HH-RLHF transcripts ------------------------------------------------------------------------


def test_hh_single_turn_split():
    prompt, response = pref.split_hh_transcript("\n\nHuman: What is 2+2?\n\nAssistant: It is 4.")
    assert prompt == [msg(U, "What is 2+2?")] and response == "It is 4."


def test_hh_multi_turn_split_keeps_earlier_assistant_turns_in_the_prompt():
    text = ("\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour:\nanything."
            "\n\nAssistant: Blue.\nOr red.\n\nShall I go on?")
    prompt, response = pref.split_hh_transcript(text)
    assert prompt == [msg(U, "Hi there."), msg(A, "Hello! How can I help?"), msg(U, "Name a colour:\nanything.")]
    # a blank line inside a turn that is not followed by "Human:"/"Assistant:" stays in the turn
    assert response == "Blue.\nOr red.\n\nShall I go on?"


def test_hh_variants_without_leading_blank_line_or_space():
    assert pref.split_hh_transcript("Human: hi\n\nAssistant:hello ") == ([msg(U, "hi")], "hello")
    # the words Human/Assistant inside a turn are not turn markers
    prompt, response = pref.split_hh_transcript("\n\nHuman: Say 'Assistant: yes'\n\nAssistant: Human: no")
    assert prompt == [msg(U, "Say 'Assistant: yes'")] and response == "Human: no"


@pytest.mark.parametrize("text,message", [
    ("\n\nHuman: Is anyone there?", "no Assistant turn"),
    ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye", "ends with a user turn"),
    ("Preamble\n\nHuman: Hi\n\nAssistant: Hello", "text before the first"),
    ("just some text", "no '\\\\n\\\\nHuman:'"),
])
def test_hh_transcripts_without_a_final_assistant_turn_are_errors(text, message):
    with pytest.raises(pref.InvalidRecord, match=message):
        pref.split_hh_transcript(text)


def test_hh_records_split_both_transcripts_and_compare_prompts(tmp_path):
    shared = "\n\nHuman: Tell me a fact.\n\nAssistant: Sure.\n\nHuman: About cats?"
    good = {"chosen": shared + "\n\nAssistant: Cats sleep a lot.", "rejected": shared + "\n\nAssistant: No."}
    other = {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, other])
    with pytest.raises(DataError, match=rf"{path}:2: 'chosen' and 'rejected' have different prompts \(turn 1"):
        pref.load_pairs([str(path)], pref.PreferenceDataOptions())
    pairs = pref.load_pairs([str(path)], pref.PreferenceDataOptions(allow_skip=True))
    assert len(pairs) == 1 and pairs[0].where == f"{path}:1"
    assert pairs[0].prompt == [msg(U, "Tell me a fact."), msg(A, "Sure."), msg(U, "About cats?")]
    assert (pairs[0].chosen, pairs[0].rejected) == ("Cats sleep a lot.", "No.")


# --- record formats -----------------------------------------------------------------------------


def test_record_formats_and_configurable_fields(tmp_path):
    records = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "system": "Be brief."},
        {"prompt": [msg(U, "Hi"), msg(A, "Hello"), msg(U, "2+2?")],  # TRL conversational, explicit prompt
         "chosen": [msg(A, "4")], "rejected": [msg(A, "5")], "margin": 2},
        {"chosen": [msg("system", "S"), msg(U, "q"), msg(A, "good")],  # implicit prompt, message lists
         "rejected": [msg("system", "S"), msg(U, "q"), msg(A, "bad")]},
        {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
        {"prompt": "q", "chosen": [{"from": "gpt", "value": "yes"}], "rejected": "no"},  # mixed, ShareGPT spelling
    ]
    path = write_jsonl(tmp_path / "d.jsonl.gz", records)
    pairs = pref.load_pairs([str(path)], pref.PreferenceDataOptions())
    assert [p.where for p in pairs] == [f"{path}:{i}" for i in range(1, 6)]
    assert pairs[0].prompt == [msg("system", "Be brief."), msg(U, "Capital of France?")]
    assert (pairs[0].chosen, pairs[0].rejected, pairs[0].margin) == ("Paris.", "Lyon.", None)
    assert pairs[1].prompt == records[1]["prompt"] and (pairs[1].chosen, pairs[1].rejected) == ("4", "5")
    assert pairs[1].margin == 2.0
    assert pairs[2].prompt == [msg("system", "S"), msg(U, "q")]
    assert (pairs[2].chosen, pairs[2].rejected) == ("good", "bad")
    assert pairs[3].prompt == [msg(U, "q")] and (pairs[3].chosen, pairs[3].rejected) == ("good", "bad")
    assert (pairs[4].chosen, pairs[4].rejected) == ("yes", "no")
    # a chosen list that continues the conversation: its earlier messages join the prompt
    longer = {"prompt": [msg(U, "a")], "chosen": [msg(A, "b"), msg(U, "c"), msg(A, "d")],
              "rejected": [msg(A, "b"), msg(U, "c"), msg(A, "e")]}
    pair = pref.record_to_pair(longer, pref.PreferenceDataOptions())
    assert pair.prompt == [msg(U, "a"), msg(A, "b"), msg(U, "c")] and (pair.chosen, pair.rejected) == ("d", "e")
    renamed = pref.PreferenceDataOptions(format="explicit", prompt_field="q", chosen_field="good",
                                         rejected_field="bad", margin_field="gap")
    pair = pref.record_to_pair({"q": "x", "good": "y", "bad": "z", "gap": 0.5}, renamed)
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin) == ([msg(U, "x")], "y", "z", 0.5)
    # forced formats: an HH record read as "conversation" is a type error
    with pytest.raises(pref.InvalidRecord, match="expected a list, got str"):
        pref.record_to_pair(records[3], pref.PreferenceDataOptions(format="conversation"))
    surrogate = pref.record_to_pair(json.loads('{"prompt": "a\\ud800b", "chosen": "c", "rejected": "d"}'),
                                    pref.PreferenceDataOptions())
    assert surrogate.prompt[0]["content"] == "a\ufffdb"
    with pytest.raises(pref.InvalidRecord, match="UTF-8"):
        pref.record_to_pair({"prompt": "a", "chosen": "c\ud800", "rejected": "d"},
                            pref.PreferenceDataOptions(invalid_utf8="error"))
    opts = pref.PreferenceDataOptions.from_config({"seq_length": 64, "other": 1, "allow_skip": True}, seq_length=32)
    assert (opts.seq_length, opts.allow_skip, opts.truncation) == (32, True, "truncate_left")  # the schema's default
    with pytest.raises(UserError, match="truncation"):
        pref.PreferenceDataOptions(truncation="cut")
    with pytest.raises(UserError, match="format"):
        pref.PreferenceDataOptions(format="trl")


BAD = [
    ("not json", "not valid JSON"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "responses are identical"),
    ({"prompt": "p", "chosen": " same\n", "rejected": "same"}, "responses are identical"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty chosen response"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:"}, "empty rejected response"),
    ({"prompt": "p", "chosen": "a"}, "no field 'rejected'"),
    ({"prompt": "p", "rejected": "a", "chosen": None}, "no field 'chosen'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt': expected a string or a message list, got int"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty prompt"),
    ({"chosen": "\n\nHuman: q", "rejected": "\n\nHuman: q\n\nAssistant: a"}, "chosen: no Assistant turn"),
    ({"chosen": [msg(U, "q"), msg(A, "a")], "rejected": [msg(U, "q")]}, "rejected: no assistant turn"),
    ({"chosen": [msg(U, "q"), msg(A, "a")], "rejected": "\n\nHuman: q\n\nAssistant: b"}, "not both transcripts"),
    ({"chosen": [msg("tool", "q"), msg(A, "a")], "rejected": [msg(U, "q"), msg(A, "b")]}, "'tool' is not one of"),
    ({"prompt": "p", "chosen": [msg("system", "s"), msg(A, "a")], "rejected": "b"}, "belongs in the prompt"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin': expected a finite number"),
]


@pytest.mark.parametrize("record,message", BAD)
def test_bad_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, record])
    with pytest.raises(DataError, match=f"{path}:2: .*{message}"):
        pref.load_pairs([str(path)], pref.PreferenceDataOptions())


def test_skipping_bad_records_is_summarised(tmp_path):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = write_jsonl(tmp_path / "d.jsonl", [good] + [r for r, _ in BAD[1:]] + [good])
    summary = pref.PreferenceDataSummary()
    pairs = pref.load_pairs([str(path)], pref.PreferenceDataOptions(allow_skip=True), summary)
    assert len(pairs) == 2 and summary.records == len(BAD) + 1 and summary.pairs == 2
    assert sum(summary.skipped.values()) == len(BAD) - 1
    assert summary.skipped["identical responses"] == 2 and summary.skipped["empty response"] == 2
    assert summary.skipped["missing field"] == 2 and summary.skipped["no assistant turn"] == 2
    assert summary.examples[0] == f"{path}:2: 'chosen' and 'rejected' responses are identical"
    text = "\n".join(summary.lines())
    assert f"skipped {len(BAD) - 1}" in text and "2 identical responses" in text
    with pytest.raises(DataError, match=":1: not valid JSON"):  # unreadable files are never skipped
        pref.load_pairs([str(write_jsonl(tmp_path / "x.jsonl", ["{"]))], pref.PreferenceDataOptions(allow_skip=True))


def test_parquet_and_datasets_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [msg(U, f"p{i}")], "chosen": [msg(A, f"c{i}")], "rejected": [msg(A, f"r{i}")]}
            for i in range(3)]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "d.parquet")
    saved = tmp_path / "saved"  # Dataset.save_to_disk's layout: Arrow stream files + state.json
    saved.mkdir()
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    opts = pref.PreferenceDataOptions()
    from_parquet = pref.load_pairs([str(tmp_path / "d.parquet")], opts)
    assert [(p.prompt[0]["content"], p.chosen, p.rejected) for p in from_parquet] == \
        [(f"p{i}", f"c{i}", f"r{i}") for i in range(3)]
    from_saved = pref.load_pairs([str(saved)], opts)
    assert [p.rejected for p in from_saved] == ["r0", "r1", "r2"]
    assert from_saved[2].where.endswith("data-00000-of-00001.arrow: row 3")
    bad = pa.Table.from_pylist([{"prompt": "p", "chosen": "x", "rejected": "x"}])
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: row 1: .*identical"):
        pref.load_pairs([str(tmp_path / "bad.parquet")], opts)


# --- tokenization: response masks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory) -> Tokenizer:
    return train_tokenizer([str(corpus)], 400, str(tmp_path_factory.mktemp("tok") / "tokenizer"))


@pytest.fixture(scope="module")
def template(tok) -> ChatTemplate:
    return ChatTemplate(tok, CHAT_TEMPLATE)


def expected_encoding(tok, messages):
    """Ids and the final-turn mask built piece by piece from the built-in format, not by rendering."""
    ids, mask = [], []
    for k, m in enumerate(messages):
        head = [tok.token_id(m["role"])] + tok.encode("\n")
        body = tok.encode(m["content"]) + [tok.token_id("end_of_turn")]
        tail = tok.encode("\n")
        ids += head + body + tail
        mask += [False] * len(head) + [k == len(messages) - 1] * len(body) + [False] * len(tail)
    return ids, mask


def test_only_the_final_assistant_turn_carries_loss(tok, template):
    prompt = [msg("system", "Answer briefly."), msg(U, "What is the king called?"), msg(A, "Richard, my lord."),
              msg(U, "And the queen?")]
    ids, mask, merges = pref.encode_response(template, prompt, "Elizabeth.")
    want_ids, want_mask = expected_encoding(tok, prompt + [msg(A, "Elizabeth.")])
    assert ids.tolist() == want_ids and mask.tolist() == want_mask and merges == 0
    eot = tok.decode([tok.token_id("end_of_turn")])
    assert tok.decode(ids[mask].tolist()) == "Elizabeth." + eot  # not "Richard, my lord." of the prompt
    # a template without a generation prompt: the final turn is still found, the earlier one left out
    plain = ChatTemplate(tok, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end_of_turn|>\n{% endfor %}")
    ids, mask, _ = pref.encode_response(plain, prompt, "Elizabeth.")
    assert tok.decode(ids[mask].tolist()).strip() == "Elizabeth." + eot


def pairs_of(*items):
    return [pref.PreferencePair(f"f:{i}", [msg(U, p)], c, r) for i, (p, c, r) in enumerate(items, start=1)]


def test_truncation_policies(tok, template):
    long = pairs_of(("tell me", "yes " * 30, "no"))[0]
    short = pairs_of(("hi", "hello", "bye"))[0]
    full_c, _, _ = pref.encode_response(template, long.prompt, long.chosen)
    full_r, _, _ = pref.encode_response(template, long.prompt, long.rejected)
    limit = 24
    assert len(full_c) > limit >= len(full_r)
    summary = pref.PreferenceDataSummary()
    kept = pref.tokenize_pairs([long, short], template, pref.PreferenceDataOptions(seq_length=limit, truncation="truncate"),
                               summary)
    assert summary.truncated == 1 and len(kept) == 2
    assert kept[0].chosen_ids.tolist() == full_c[:limit].tolist() and kept[0].rejected_ids.tolist() == full_r.tolist()
    # truncate_left: the same cut from both starts, at most up to the response, then the end
    left_opts = pref.PreferenceDataOptions(seq_length=limit, truncation="truncate_left")
    left = pref.tokenize_pairs([long], template, left_opts)[0]
    prompt_tokens = len(template.prompt_ids(long.prompt))
    cut = prompt_tokens - 1  # "yes " * 30 alone is over the limit: all the prompt but one token goes
    assert len(full_c) - prompt_tokens + 1 > limit
    assert left.chosen_ids.tolist() == full_c[cut:cut + limit].tolist()
    assert left.rejected_ids.tolist() == full_r[cut:].tolist()
    assert tok.decode(left.chosen_ids[left.chosen_mask].tolist()).startswith("yes yes")
    assert tok.decode(left.rejected_ids[left.rejected_mask].tolist()).startswith("no")
    long_prompt = pairs_of(("tell me " * 30, "yes", "no"))[0]
    lp_c, _, _ = pref.encode_response(template, long_prompt.prompt, long_prompt.chosen)
    lp_r, _, _ = pref.encode_response(template, long_prompt.prompt, long_prompt.rejected)
    left = pref.tokenize_pairs([long_prompt], template, left_opts)[0]
    cut = max(len(lp_c), len(lp_r)) - limit  # only prompt tokens go: the longer side just fits
    assert left.chosen_ids.tolist() == lp_c[cut:].tolist() and left.rejected_ids.tolist() == lp_r[cut:].tolist()
    assert max(len(left.chosen_ids), len(left.rejected_ids)) == limit
    assert left.chosen_ids[:5].tolist() == left.rejected_ids[:5].tolist()
    summary = pref.PreferenceDataSummary()
    drop = pref.PreferenceDataOptions(seq_length=limit, truncation="drop")
    dropped = pref.tokenize_pairs([long, short], template, drop, summary)
    assert len(dropped) == 1 and summary.dropped_too_long == 1 and dropped[0].where == "f:1"
    with pytest.raises(DataError, match=rf"f:1: {len(full_c)} tokens, more than seq_length = {limit}"):
        pref.tokenize_pairs([long], template, pref.PreferenceDataOptions(seq_length=limit, truncation="error"))
    # a truncation that leaves a side without response tokens skips the pair, reported
    summary = pref.PreferenceDataSummary()
    cut_right = pref.PreferenceDataOptions(seq_length=limit, truncation="truncate")
    pref.tokenize_pairs([long_prompt, short], template, cut_right, summary)
    assert summary.skipped["no response tokens"] == 1 and summary.samples == 1
    with pytest.raises(DataError, match="no usable pairs"):
        pref.tokenize_pairs([long_prompt], template, cut_right)


# --- batches: chosen and rejected in one forward ------------------------------------------------


def fake_token_logps(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a model's log pi(label_j | tokens_<=j), depending on the context."""
    context = torch.cumsum(tokens, dim=-1).float()
    return -(0.01 * labels.float() + 0.001 * (context % 97))


def direct_logp(ids: list[int], response_positions: list[int]) -> float:
    """sum over response tokens t of log pi(ids[t] | ids[:t]), computed token by token."""
    total = 0.0
    for t in response_positions:
        context = sum(ids[:t])  # the inputs at positions 0..t-1
        total += -(0.01 * ids[t] + 0.001 * (context % 97))
    return total


def test_batch_layout_chosen_rows_first_and_log_probs_equal_a_direct_computation(tok, template):
    items = pairs_of(("What is 2+2?", "4", "5, I think"), ("Name a colour.", "Blue is a colour.", "Car"),
                     ("Hi", "Hello there, friend.", "Go away."))
    items[1].margin = 1.5
    samples = pref.tokenize_pairs(items, template, pref.PreferenceDataOptions(seq_length=40))
    ds = pref.PreferenceDataset(samples, 40, pad_id=tok.pad_id)
    batch = pref.collate_pairs([ds[i] for i in range(3)])
    assert set(batch) == set(pref.BATCH_KEYS) | {"margin", "index"}
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["tokens"].shape == (6, 40) and batch["tokens"].dtype == torch.int64
    assert batch["margin"].tolist() == [0.0, 1.5, 0.0]
    eot = tok.decode([tok.token_id("end_of_turn")])
    per_token = fake_token_logps(batch["tokens"], batch["labels"])
    chosen_sum, rejected_sum = pref.split_chosen_rejected(sequence_logps(per_token, batch["loss_mask"]))
    for i, pair in enumerate(items):
        for row, text, logp in ((i, pair.chosen, chosen_sum[i]), (3 + i, pair.rejected, rejected_sum[i])):
            ids, want_mask = expected_encoding(tok, pair.prompt + [msg(A, text)])
            n = len(ids)
            assert batch["tokens"][row, :n].tolist() == ids  # the whole sequence is input
            assert batch["labels"][row, :n - 1].tolist() == ids[1:]
            assert batch["last_index"][row].item() == n - 1
            assert batch["position_ids"][row, :n].tolist() == list(range(n))
            assert (batch["segment_ids"][row, :n] == 1).all() and (batch["segment_ids"][row, n:] == 0).all()
            assert (batch["tokens"][row, n:] == tok.pad_id).all() and not batch["loss_mask"][row, n - 1:].any()
            # the loss covers exactly the response and its end-of-turn token; no prompt token
            labelled = batch["labels"][row][batch["loss_mask"][row].bool()].tolist()
            assert tok.decode(labelled) == text + eot
            response_positions = [t for t in range(n) if want_mask[t]]
            assert labelled == [ids[t] for t in response_positions]
            assert logp.item() == pytest.approx(direct_logp(ids, response_positions), rel=1e-5)
    average = sequence_logps(per_token, batch["loss_mask"], average=True)
    counts = batch["loss_mask"].sum(-1)
    assert torch.allclose(average * counts, sequence_logps(per_token, batch["loss_mask"]))
    with pytest.raises(ValueError, match="even number"):
        pref.split_chosen_rejected(torch.zeros(3))


def test_batches_per_rank_cover_the_stream_and_resume(tok, template):
    items = pairs_of(*[(f"q{i}", f"good {i}", f"bad {i}") for i in range(10)])
    ds = pref.PreferenceDataset(pref.tokenize_pairs(items, template, pref.PreferenceDataOptions(seq_length=24)), 24,
                                tok.pad_id)

    def stream(it, n):
        return [b["tokens"] for b in (next(it) for _ in range(n))]

    one = stream(pairs(ds, 2, 0, 1, seed=3), 10)  # 20 pairs: two epochs
    ranks = [stream(pairs(ds, 1, r, 2, seed=3), 10) for r in range(2)]
    for k in range(10):  # rank 0 takes pair 0 of each global batch, rank 1 pair 1; chosen rows first
        assert one[k].shape == (4, 24)
        assert torch.equal(one[k], torch.stack([ranks[0][k][0], ranks[1][k][0], ranks[0][k][1], ranks[1][k][1]]))
    epoch0 = [b for k in range(5) for b in (one[k][:2], one[k][2:])]
    chosen_rows = sorted(tuple(r.tolist()) for b in epoch0[0::2] for r in b)
    assert chosen_rows == sorted(tuple(ds[i]["tokens"][0].tolist()) for i in range(10))
    resumed = stream(pairs(ds, 2, 0, 1, consumed_samples=8, seed=3), 6)
    assert all(torch.equal(a, b) for a, b in zip(resumed, one[4:]))


def test_prepare_end_to_end(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
        {"prompt": "q", "chosen": "a", "rejected": "b"}])
    prepared = pref.prepare([str(path)], tok, pref.PreferenceDataOptions(seq_length=64))
    assert prepared.added_tokens == [] and len(prepared.samples) == 2
    s = prepared.summary
    assert s.records == 2 and s.samples == 2 and s.longest <= 64
    assert s.chosen_response_tokens == sum(int(x.chosen_mask[1:].sum()) for x in prepared.samples)
    assert "preference data: 2 records, 2 pairs" in s.lines()[0] and json.dumps(s.as_dict())
    assert np.array_equal(prepared.samples[0].chosen_ids[:3], prepared.samples[0].rejected_ids[:3])


def test_pair_batches_cut_padding_and_keep_their_per_pair_entries(tok, template):
    items = pairs_of(*[(f"q{i}", f"good {i}", "bad " * (i + 1)) for i in range(6)])
    samples = pref.tokenize_pairs(items, template, pref.PreferenceDataOptions(seq_length=48))
    ds = pref.PreferenceDataset(samples, 48, tok.pad_id, reference=np.arange(12.0).reshape(6, 2))
    full, cut = (pairs(ds, 2, 0, 1, seed=5, pad_multiple=m) for m in (0, 16))
    for _ in range(3):
        a, b = next(full), next(cut)
        length = b["tokens"].shape[1]
        assert length % 16 == 0 and length < 48 and int(a["last_index"].max()) < length
        assert all(torch.equal(b[k], a[k][:, :length] if a[k].dim() == 2 else a[k]) for k in a)
        assert not a["loss_mask"][:, length:].any()
    assert sum(cut.take_shapes().values()) == 3
