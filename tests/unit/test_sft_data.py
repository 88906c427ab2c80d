"""SFT data: record shapes and validation, chat templates and assistant loss masks (token by token),
truncation, packing, batches per data-parallel rank, the synthetic instruction set."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megaflow.data import packing, sft
from megaflow.data.chat import ChatTemplate, chat_tokenizer, grow_embedding
from megaflow.data.records import EXAMPLES_KEPT
from megaflow.data.sampler import MicroBatches
from megaflow.data.synthetic import make_instruction_data, write_instruction_data
from megaflow.data.tokenizer import CHAT_TEMPLATE, Tokenizer, train_tokenizer
from megaflow.errors import DataError, UserError

from tests.conftest import SAMPLE

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the king called?"},
    {"role": "assistant", "content": "Richard, my lord."},
    {"role": "user", "content": " And the queen?"},
    {"role": "assistant", "content": "Elizabeth.\n"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": " You are welcome "},
]

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# The same format with transformers' {% generation %} marks, from which HF computes its own assistant mask.
CHATML_MARKED = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
                 "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
                 "{% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def builtin_tok(corpus, tmp_path_factory) -> Tokenizer:
    return train_tokenizer([str(corpus)], 400, str(tmp_path_factory.mktemp("tok") / "tokenizer"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A ChatML tokenizer built here: a byte-level BPE over a few lines, its template in tokenizer_config."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([m["content"] for m in CONVERSATION] * 3 + ["the king and the queen are here"], trainer)
    out = tmp_path_factory.mktemp("hf")
    bpe.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def loss_tokens(ids, mask) -> list[int]:
    return [i for i, m in zip(ids, mask) if m]


# --- chat templates and assistant masks ---------------------------------------------------------


def test_builtin_template_masks_exactly_the_assistant_tokens(builtin_tok):
    """The expected ids and mask are built piece by piece from the documented format, not by rendering."""
    tok, source, added = chat_tokenizer(builtin_tok, "auto")
    assert source == CHAT_TEMPLATE and added == [] and tok.vocab_size == builtin_tok.vocab_size
    encoded = ChatTemplate(tok, source).encode(CONVERSATION)
    expected_ids, expected_mask = [], []
    for m in CONVERSATION:
        head = [tok.token_id(m["role"])] + tok.encode("\n")
        body = tok.encode(m["content"]) + [tok.token_id("end_of_turn")]
        tail = tok.encode("\n")
        expected_ids += head + body + tail
        expected_mask += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False] * len(tail)
    assert encoded.ids == expected_ids
    assert encoded.assistant_mask == expected_mask
    assert encoded.boundary_merges == 0
    # the loss tokens spell the three answers, each with its end-of-turn token
    eot = tok.decode([tok.token_id("end_of_turn")])
    assert tok.decode(loss_tokens(encoded.ids, encoded.assistant_mask)) == \
        "".join(m["content"] + eot for m in CONVERSATION if m["role"] == "assistant")


def test_hf_tokenizer_template_matches_transformers_ids_and_assistant_mask(hf_dir):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.load(hf_dir)
    assert tok.chat_template == CHATML
    _, source, added = chat_tokenizer(tok, "auto")
    assert source == CHATML and added == []
    template = ChatTemplate(tok, source)
    encoded = template.encode(CONVERSATION)

    hf = PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    reference = hf.apply_chat_template(CONVERSATION, chat_template=CHATML_MARKED, tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
    assert encoded.ids == list(reference["input_ids"])
    assert encoded.assistant_mask == [bool(m) for m in reference["assistant_masks"]]
    assert encoded.ids == list(hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"])
    # token by token: each assistant turn's content and its <|im_end|>, nothing else
    im_end = tok.encode("<|im_end|>")
    expected = [i for m in CONVERSATION if m["role"] == "assistant" for i in tok.encode(m["content"]) + im_end]
    assert loss_tokens(encoded.ids, encoded.assistant_mask) == expected
    # the marked template gives the same through megaflow's own {% generation %} support
    marked = ChatTemplate(tok, CHATML_MARKED).encode(CONVERSATION)
    assert (marked.ids, marked.assistant_mask) == (encoded.ids, encoded.assistant_mask)
    # a prompt for generation ends with the assistant header
    assert template.prompt_ids(CONVERSATION[:2]) == list(
        hf.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def test_a_token_across_the_turn_boundary_is_found_and_counted(hf_dir):
    """'assistant: ' + 'the king' tokenizes as ':', ' the', ... in the whole text but ':', ' ' alone: the
    boundary falls inside ' the', which then carries loss; the whole render's ids are kept."""
    tok = Tokenizer.load(hf_dir)
    template = ChatTemplate(tok, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                                 "{% if add_generation_prompt %}assistant: {% endif %}")
    messages = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "the king"}]
    assert tok.encode(" the") == [tok.encode(" the")[0]]  # one token in this vocabulary
    encoded = template.encode(messages)
    assert encoded.ids == tok.encode(template.render(messages))
    assert encoded.boundary_merges == 1
    assert tok.decode(loss_tokens(encoded.ids, encoded.assistant_mask)) == " the king<|im_end|>"


def test_template_without_generation_prompt_still_masks_only_the_answer(hf_dir):
    tok = Tokenizer.load(hf_dir)
    bare = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    encoded = ChatTemplate(tok, bare).encode(CONVERSATION[1:3])
    assert tok.decode(loss_tokens(encoded.ids, encoded.assistant_mask)) == "Richard, my lord.<|im_end|>"


def test_sentencepiece_template_with_bos_and_eos_tokens(tmp_path):
    """A Llama-2 style template on a SentencePiece model: "<s>" and "</s>" in the render become their single
    ids (SentencePiece alone would spell them out), and the answers with their "</s>" carry the loss."""
    sentencepiece = pytest.importorskip("sentencepiece")
    lines = [line for line in SAMPLE.read_text()[:30_000].splitlines() if line.strip()]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=300, model_type="bpe", minloglevel=2)
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    tok = Tokenizer.load(tmp_path / "sp.model")
    messages = [{"role": "user", "content": "Who comes?"}, {"role": "assistant", "content": "The king."},
                {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "The lord."}]
    encoded = ChatTemplate(tok, template).encode(messages)
    assert encoded.ids[0] == tok.bos_id and encoded.ids.count(tok.eod_id) == 2 and encoded.ids[-1] == tok.eod_id
    answers = loss_tokens(encoded.ids, encoded.assistant_mask)
    first_end = answers.index(tok.eod_id)
    assert tok.decode(answers[:first_end]).strip() == "The king."
    assert tok.decode(answers[first_end + 1:-1]).strip() == "The lord." and answers[-1] == tok.eod_id
    assert not any(encoded.assistant_mask[i] for i, t in enumerate(encoded.ids) if t == tok.bos_id)
    assert "INST" not in tok.decode(answers)


def test_unsplittable_template_and_bad_choices_are_errors(hf_dir, tmp_path):
    tok = Tokenizer.load(hf_dir)
    odd = ("{% for m in messages %}{{ m['content'] }}{% if loop.last %}<|im_end|>{% endif %}\n{% endfor %}"
           "{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(DataError, match="not a prefix"):
        ChatTemplate(tok, odd).encode([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                       {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])
    with pytest.raises(UserError, match="chat_template"):
        chat_tokenizer(tok, str(tmp_path / "missing.jinja"))
    with pytest.raises(UserError, match="not valid Jinja"):
        ChatTemplate(tok, "{% for %}")
    path = tmp_path / "t.jinja"
    path.write_text(CHATML)
    assert chat_tokenizer(tok, str(path))[1] == CHATML


def test_builtin_template_adds_its_tokens_and_grows_the_vocabulary(hf_dir, tmp_path):
    tok = Tokenizer.load(hf_dir)
    grown, source, added = chat_tokenizer(tok, "builtin")
    assert source == CHAT_TEMPLATE
    assert added == ["<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>"]
    assert grown.vocab_size == tok.vocab_size + 4 and tok.vocab_size == 320  # the original is untouched
    assert [grown.token_id(n) for n in ("system", "user", "assistant", "end_of_turn")] == [320, 321, 322, 323]
    encoded = ChatTemplate(grown, source).encode(CONVERSATION[1:3])
    assert loss_tokens(encoded.ids, encoded.assistant_mask)[-1] == 323
    grown.save(tmp_path / "tok")  # saved with its template and the new tokens; loads back the same
    again = Tokenizer.load(tmp_path / "tok")
    assert again.chat_template == CHAT_TEMPLATE and again.token_id("end_of_turn") == 323
    assert chat_tokenizer(again, "auto")[2] == []
    weight = torch.randn(320, 8)
    bigger = grow_embedding(weight, 384)
    assert bigger.shape == (384, 8) and torch.equal(bigger[:320], weight)
    assert (bigger[320:] - weight.mean(0)).abs().max() < weight.std(0).max()


# --- records ------------------------------------------------------------------------------------


def write_jsonl(path: Path, records) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_record_shapes_and_configurable_fields(tmp_path):
    records = [
        {"messages": CONVERSATION},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"prompt": "p", "response": "r", "system": "s"},
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl.gz", records[:1] + records[2:])
    convs = sft.load_conversations([str(path)], sft.SFTDataOptions())
    assert [c.where for c in convs] == [f"{path}:{i}" for i in (1, 2, 3, 4)]
    assert convs[0].messages == CONVERSATION
    assert convs[1].messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "p"},
                                 {"role": "assistant", "content": "r"}]
    assert convs[2].messages[0] == {"role": "user", "content": "Add.\n\n1 2"}
    assert convs[3].messages[0] == {"role": "user", "content": "Say hi."}
    sharegpt = sft.record_to_messages(records[1], sft.SFTDataOptions(messages_field="conversations"))
    assert sharegpt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    renamed = sft.SFTDataOptions(format="prompt_response", prompt_field="question", response_field="answer")
    assert sft.record_to_messages({"question": "q", "answer": "a"}, renamed)[1] == {"role": "assistant", "content": "a"}
    trailing = {"messages": CONVERSATION + [{"role": "user", "content": "more?"}]}
    assert sft.record_to_messages(trailing, sft.SFTDataOptions()) == CONVERSATION
    surrogate = sft.record_to_messages(json.loads('{"prompt": "a\\ud800b", "response": "c"}'), sft.SFTDataOptions())
    assert surrogate[0]["content"] == "a\ufffdb"
    with pytest.raises(sft.InvalidRecord, match="UTF-8"):
        sft.record_to_messages({"prompt": "a\ud800", "response": "c"}, sft.SFTDataOptions(invalid_utf8="error"))
    opts = sft.SFTDataOptions.from_config({"packing": False, "seq_length": 64, "other": 1}, seq_length=32)
    assert (opts.packing, opts.seq_length, opts.truncation) == (False, 32, "truncate")
    with pytest.raises(UserError, match="truncation"):
        sft.SFTDataOptions(truncation="cut")


BAD = [
    ("not json", "not valid JSON"),
    ({"messages": []}, "empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "'tool' is not one of"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "only allowed first"),
    ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "y"}]}, "expected a string"),
    ({"prompt": "p", "response": 3}, "expected a string, got int"),
    ({"text": "plain"}, "no 'messages'"),
]


@pytest.mark.parametrize("record,message", BAD)
def test_bad_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, record])
    with pytest.raises(DataError, match=f"{path}:2: .*{message}"):
        sft.load_conversations([str(path)], sft.SFTDataOptions())


def test_skipping_bad_records_is_summarised(tmp_path):
    good = {"prompt": "a", "response": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [good] + [r for r, _ in BAD[1:]] + [good])
    summary = sft.SFTDataSummary()
    convs = sft.load_conversations([str(path)], sft.SFTDataOptions(allow_skip=True), summary)
    assert len(convs) == 2 and summary.records == len(BAD) + 1
    assert sum(summary.skipped.values()) == len(BAD) - 1
    assert summary.skipped["bad role"] == 2 and summary.skipped["wrong type"] == 2
    assert summary.examples[0].startswith(f"{path}:2: ") and len(summary.examples) == EXAMPLES_KEPT
    text = "\n".join(summary.lines())
    assert "skipped 7" in text and "2 bad role" in text
    with pytest.raises(DataError, match=":1: not valid JSON"):  # unreadable files are never skipped
        sft.load_conversations([str(write_jsonl(tmp_path / "x.jsonl", ["{"]))], sft.SFTDataOptions(allow_skip=True))


def test_parquet_and_datasets_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)])
    pq.write_table(table, tmp_path / "d.parquet")
    saved = tmp_path / "saved"  # the layout datasets' save_to_disk writes: Arrow stream files + state.json
    saved.mkdir()
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (saved / "dataset_info.json").write_text("{}")
    snapshot = tmp_path / "snapshot" / "data"  # a dataset repository snapshot: its data files
    snapshot.mkdir(parents=True)
    write_jsonl(snapshot / "b.jsonl", [{"prompt": "p9", "response": "r9"}])
    pq.write_table(table, snapshot / "a.parquet")
    opts = sft.SFTDataOptions()
    assert [c.messages[0]["content"] for c in sft.load_conversations([str(tmp_path / "d.parquet")], opts)] == ["p0", "p1", "p2"]
    from_saved = sft.load_conversations([str(saved)], opts)
    assert [c.messages[1]["content"] for c in from_saved] == ["r0", "r1", "r2"]
    assert from_saved[2].where.endswith("data-00000-of-00001.arrow: row 3")
    assert len(sft.load_conversations([str(tmp_path / "snapshot")], opts)) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl"):
        sft.load_conversations([str(tmp_path / "empty")], opts)


# --- tokenization, truncation, loss masks -------------------------------------------------------


@pytest.fixture(scope="module")
def template(builtin_tok) -> ChatTemplate:
    return ChatTemplate(builtin_tok, CHAT_TEMPLATE)


def conv(i, prompt, answer):
    return sft.Conversation(f"f:{i}", [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


def test_truncation_policies_and_train_on_prompt(template):
    long = conv(1, "tell me", "yes " * 40)
    short = conv(2, "hi", "hello")
    full = template.encode(long.messages)
    for policy, kept in (("truncate", 33), ("truncate_left", 33), ("drop", None)):
        summary = sft.SFTDataSummary()
        samples = sft.tokenize([long, short], template, sft.SFTDataOptions(seq_length=32, truncation=policy), summary)
        if kept is None:
            assert len(samples) == 1 and summary.dropped_too_long == 1
            continue
        assert summary.truncated == 1 and len(samples[0].ids) == kept
        expected = full.ids[:kept] if policy == "truncate" else full.ids[-kept:]
        assert samples[0].ids.tolist() == expected
    with pytest.raises(DataError, match=r"f:1: \d+ tokens, more than seq_length \+ 1 = 33"):
        sft.tokenize([long], template, sft.SFTDataOptions(seq_length=32, truncation="error"))
    # a truncation that leaves no assistant token drops the sample, reported
    summary = sft.SFTDataSummary()
    long_prompt = conv(3, "tell me " * 40, "yes")
    sft.tokenize([long_prompt, short], template, sft.SFTDataOptions(seq_length=32, truncation="truncate"), summary)
    assert summary.skipped["no loss tokens"] == 1 and summary.samples == 1
    prompt_too = sft.tokenize([short], template, sft.SFTDataOptions(train_on_prompt=True))[0]
    assert prompt_too.mask.all()
    answer_only = sft.tokenize([short], template, sft.SFTDataOptions())[0]
    assert answer_only.mask.sum() == len(template.tokenizer.encode("hello")) + 1


# --- packing and batches ------------------------------------------------------------------------


def test_pack_fits_every_sample_once_and_fills_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500).tolist()
    rows = packing.pack(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= -(-sum(lengths) // 64) * 1.1 + 1  # close to the lower bound
    assert rows == packing.pack(lengths, 64)
    assert packing.pack(lengths, 64, packing=False) == [[i] for i in range(500)]
    with pytest.raises(ValueError):
        packing.pack([65], 64)


def test_rows_keep_samples_apart(template):
    convs = [conv(i, f"question {i}", "answer " * (i % 4 + 1)) for i in range(12)]
    samples = sft.tokenize(convs, template, sft.SFTDataOptions(seq_length=48))
    packed = sft.SFTDataset(samples, 48, pad_id=1, packing=True)
    single = sft.SFTDataset(samples, 48, pad_id=1, packing=False)
    assert len(single) == 12 and len(packed) < 12
    assert packed.packing_efficiency > single.packing_efficiency
    seen = set()
    for r in range(len(packed)):
        row = packed[r]
        at = 0
        for k, j in enumerate(packed.row_samples(r), start=1):
            s, n = samples[j], len(samples[j].ids) - 1
            assert row["tokens"][at:at + n].tolist() == s.ids[:-1].tolist()
            assert row["labels"][at:at + n].tolist() == s.ids[1:].tolist()  # no label crosses a boundary
            assert row["loss_mask"][at:at + n].tolist() == s.mask[1:].astype(float).tolist()
            assert row["position_ids"][at:at + n].tolist() == list(range(n))
            assert (row["segment_ids"][at:at + n] == k).all()
            at += n
            seen.add(j)
        assert (row["segment_ids"][at:] == 0).all() and (row["loss_mask"][at:] == 0).all()
        assert (row["tokens"][at:] == 1).all()
    assert seen == set(range(12))
    summary = sft.SFTDataSummary()
    packed.record_in(summary)
    assert summary.rows == len(packed) and "packing efficiency" in summary.lines()[-1]


def test_block_diagonal_mask_and_cu_seqlens():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    mask = packing.block_diagonal_mask(seg)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert mask[b, 0, i, j].item() == (not (j <= i and seg[b, i] == seg[b, j]))
    cu, longest = packing.cu_seqlens(seg)
    assert cu.tolist() == [0, 3, 5, 6, 7, 10, 12] and cu.dtype == torch.int32 and longest == 3
    flat = packing.to_thd({"segment_ids": seg, "tokens": torch.arange(12).reshape(2, 6)})
    assert flat["tokens"].shape == (1, 12)
    assert packing.cu_seqlens(flat["segment_ids"])[0].tolist() == cu.tolist()


def test_batches_per_rank_cover_the_stream_and_resume(template):
    samples = sft.tokenize([conv(i, f"q{i}", f"a{i}") for i in range(10)], template, sft.SFTDataOptions(seq_length=16))
    ds = sft.SFTDataset(samples, 16, pad_id=1, packing=False)

    def stream(it, n):
        return [b["tokens"] for b in (next(it) for _ in range(n))]

    one = stream(MicroBatches(ds, 2, 0, 1, seed=3, shuffle=True), 10)  # 20 rows: two epochs
    ranks = [stream(MicroBatches(ds, 1, r, 2, seed=3, shuffle=True), 10) for r in range(2)]
    assert all(torch.equal(one[k], torch.cat([ranks[0][k], ranks[1][k]])) for k in range(10))
    epoch0 = torch.cat(one[:5])
    assert sorted(map(tuple, epoch0.tolist())) == sorted(tuple(ds[i]["tokens"].tolist()) for i in range(10))
    assert not torch.equal(epoch0, torch.cat(one[5:]))  # a new order each epoch
    resumed = stream(MicroBatches(ds, 2, 0, 1, consumed_samples=8, seed=3, shuffle=True), 6)
    assert all(torch.equal(a, b) for a, b in zip(resumed, one[4:]))
    batch = next(MicroBatches(ds, 2, 0, 1, shuffle=True))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "segment_ids"}
    assert batch["tokens"].shape == (2, 16) and batch["tokens"].dtype == torch.int64


def test_prepare_end_to_end_and_exact_match_examples(builtin_tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}, {"prompt": "hi", "response": "yo"}])
    prepared = sft.prepare([str(path)], builtin_tok, sft.SFTDataOptions(seq_length=128))
    assert prepared.added_tokens == [] and len(prepared.samples) == 2
    assert prepared.summary.records == 2 and prepared.summary.loss_tokens == sum(s.mask[1:].sum() for s in prepared.samples)
    train, held = sft.split_holdout(list(range(100)), 0.1, seed=5)
    assert len(held) == 10 and sorted(train + held) == list(range(100)) and (train, held) == sft.split_holdout(list(range(100)), 0.1, seed=5)
    prompt, answer = sft.exact_match_examples(prepared.samples)[1]
    assert prompt == [{"role": "user", "content": "hi"}] and answer == "yo"


# --- the synthetic instruction set --------------------------------------------------------------


def test_synthetic_instruction_data_is_exact_deterministic_and_disjoint(tmp_path):
    text = SAMPLE.read_text()[:200_000]
    train, heldout = make_instruction_data(text, 400, 60, seed=1)
    assert (train, heldout) == make_instruction_data(text, 400, 60, seed=1)
    assert len(train) == 400 and len(heldout) == 60
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert {r["task"] for r in train} == {"copy", "first", "last"}
    for r in train + heldout:
        words = r["prompt"].split("\n")[1:]
        assert len(words) == 3 and all(w.isalpha() and w.islower() for w in words)
        expected = {"copy": "\n".join(words), "first": words[0], "last": words[-1]}[r["task"]]
        assert r["response"] == expected
    other, _ = make_instruction_data(text, 8, 0, seed=1, tasks=("reverse", "add"))
    assert other[0]["response"] == "\n".join(reversed(other[0]["prompt"].split("\n")[1:]))
    a_, b_ = map(int, other[1]["prompt"].removeprefix("What is ").removesuffix("?").split(" plus "))
    assert other[1]["response"] == str(a_ + b_)
    a = write_instruction_data(SAMPLE, tmp_path / "a", 50, 10)
    b = write_instruction_data(SAMPLE, tmp_path / "b", 50, 10)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert len(sft.load_conversations([str(a[0])], sft.SFTDataOptions())) == 50


def test_noisy_demonstrations_keep_the_right_answer():
    """noise=0.4: about 40% of the training responses wrong, every record's `answer` right, held-out clean,
    the prompts those of the clean set; the bundled file is this generator's output."""
    text = SAMPLE.read_text()
    clean, clean_held = make_instruction_data(text, 2000, 200, seed=0)
    noisy, held = make_instruction_data(text, 2000, 200, seed=0, noise=0.4)
    assert held == clean_held and [r["prompt"] for r in noisy] == [r["prompt"] for r in clean]
    assert all(r["answer"] == c["response"] for r, c in zip(noisy, clean))
    wrong = sum(r["response"] != r["answer"] for r in noisy) / len(noisy)
    assert 0.35 < wrong < 0.45
    bundled = [json.loads(line) for line in (SAMPLE.parent / "sft-words-noisy" / "train.jsonl").read_text().splitlines()]
    assert bundled == noisy



def test_trim_padding_cuts_after_the_longest_row_to_a_multiple():
    seg = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 2, 2, 2, 0, 0, 0]])
    batch = {k: torch.arange(16).reshape(2, 8) + i for i, k in enumerate(packing.ROW_KEYS)} | {"segment_ids": seg}
    batch["last_index"] = torch.tensor([2, 4])
    cut = packing.trim_padding(batch, 2)  # longest row: 5 tokens -> 6 positions
    assert all(torch.equal(cut[k], batch[k][:, :6]) for k in packing.ROW_KEYS)
    assert cut["last_index"] is batch["last_index"]  # per-row entries stay
    assert packing.trim_padding(batch, 4)["tokens"].shape == (2, 8)  # 5 -> 8: nothing to cut
    assert packing.trim_padding(batch, 16) is batch  # never longer than the rows
    assert packing.trim_padding(batch, 1)["tokens"].shape == (2, 5)


def test_iterator_cuts_padding_and_counts_what_it_yielded(template):
    samples = sft.tokenize([conv(i, f"q{i}", "a" * (i + 1)) for i in range(6)], template,
                           sft.SFTDataOptions(seq_length=64))
    ds = sft.SFTDataset(samples, 64, pad_id=1, packing=False)
    full, cut = MicroBatches(ds, 3, 0, 1, seed=3, shuffle=True), MicroBatches(ds, 3, 0, 1, seed=3, pad_multiple=8, shuffle=True)
    shapes = []
    for _ in range(4):
        a, b = next(full), next(cut)
        longest = int((a["segment_ids"] > 0).sum(1).max())
        assert b["tokens"].shape == (3, -(-longest // 8) * 8) and b["tokens"].shape[1] < 64
        assert all(torch.equal(b[k], a[k][:, :b[k].shape[1]]) for k in a)
        assert not a["loss_mask"][:, b["tokens"].shape[1]:].any()  # only padding was cut
        shapes.append(tuple(b["tokens"].shape))
    assert cut.take_shapes() == Counter(shapes) and not cut.take_shapes() and not full.take_shapes()


def test_holdout_leaves_something_to_train_on_and_holds_one_out():
    assert sft.split_holdout([1, 2], 0.9, seed=5)[0] and len(sft.split_holdout([1, 2], 0.9, seed=5)[1]) == 1
    assert sft.split_holdout([1], 0.5, seed=5) == ([1], [])
    assert len(sft.split_holdout(list(range(30)), 0.01, seed=5)[1]) == 1
