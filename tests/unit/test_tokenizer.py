"""Tokenizer: training byte-level BPE, loading HF and SentencePiece files, saving, special tokens."""

import json
import shutil
from pathlib import Path

import pytest

from megaflow.data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, train_tokenizer
from megaflow.errors import DataError

from tests.conftest import SAMPLE
TRICKY_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "  leading spaces, trailing spaces  \n\n\ttabs\r\nand CRLF\r\n",
    "naïve café, Straße, ½ — “quotes” … e\u0301 (combining accent)",
    "日本語のテキスト, 한국어, العربية, עברית, Ελληνικά",
    "emoji 🎉🙂👨‍👩‍👧‍👦 flags 🇫🇷 and a lone replacement char \ufffd",
    "control \x00\x01\x7f chars, a special token in the text: <|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([str(corpus)], 1000, str(output))
    return output


def test_special_tokens_come_first_and_are_single_tokens(trained):
    tok = Tokenizer.load(trained)
    assert tok.vocab_size == 1000
    assert tok.special_tokens == SPECIAL_TOKENS
    for expected_id, token in enumerate(SPECIAL_TOKENS.values()):
        assert tok.encode(token) == [expected_id]
    assert (tok.eod_id, tok.pad_id, tok.bos_id) == (0, 1, 2)
    assert tok.token_id("end_of_turn") == 6


def test_config_carries_special_tokens_and_chat_template(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((trained / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|pad|>"
    assert config["bos_token"] == "<|begin_of_text|>"
    assert config["chat_template"] == CHAT_TEMPLATE == Tokenizer.load(trained).chat_template


def test_chat_template_renders_the_documented_format(trained):
    jinja2 = pytest.importorskip("jinja2")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert text == ("<|system|>\nBe brief.<|end_of_turn|>\n<|user|>\nHi!<|end_of_turn|>\n"
                    "<|assistant|>\nHello.<|end_of_turn|>\n<|user|>\nBye<|end_of_turn|>\n<|assistant|>\n")
    tok = Tokenizer.load(trained)
    ids = tok.encode(text)
    assert ids.count(tok.token_id("end_of_turn")) == 4 and ids.count(tok.token_id("user")) == 2


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_byte_level_round_trip(trained, text):
    tok = Tokenizer.load(trained)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_save_and_load_keep_ids(trained, corpus, tmp_path):
    tok = Tokenizer.load(trained)
    tok.save(tmp_path / "copy")
    again = Tokenizer.load(tmp_path / "copy")
    text = corpus.read_text()[:5000] + "".join(TRICKY_TEXTS)
    assert again.encode(text) == tok.encode(text)
    assert again.encode_batch(TRICKY_TEXTS) == [tok.encode(t) for t in TRICKY_TEXTS]
    assert (again.vocab_size, again.special_tokens, again.chat_template) == \
           (tok.vocab_size, tok.special_tokens, tok.chat_template)


def test_transformers_loads_a_trained_tokenizer(trained):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(trained))
    tok = Tokenizer.load(trained)
    text = "".join(TRICKY_TEXTS[:5])
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (tok.eod_id, tok.pad_id, tok.bos_id)
    rendered = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>\nHi<|end_of_turn|>\n<|assistant|>\n"


def test_training_replaces_a_tokenizer_atomically(corpus, trained, tmp_path):
    output = tmp_path / "tok"
    train_tokenizer([str(corpus)], 300, str(output))
    assert Tokenizer.load(output).vocab_size == 300
    train_tokenizer([str(corpus)], 400, str(output))  # retrain in place
    assert Tokenizer.load(output).vocab_size == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary or old directories left


def test_failed_training_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        train_tokenizer([str(bad)], 300, str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_training_refuses_to_replace_a_directory_that_is_not_a_tokenizer(corpus, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a tokenizer directory"):
        train_tokenizer([str(corpus)], 300, str(tmp_path / "run"))
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("inputs, vocab_size, message", [
    ([], 1000, "at least one input"),
    (["CORPUS"], 262, "vocab_size 262 is too small"),
    (["does/not/exist.txt"], 1000, "input file not found: does/not/exist.txt"),
    (["EMPTY"], 1000, "no documents"),
])
def test_training_rejects_bad_arguments(corpus, tmp_path, inputs, vocab_size, message):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    inputs = [{"CORPUS": str(corpus), "EMPTY": str(tmp_path / "empty.txt")}.get(p, p) for p in inputs]
    with pytest.raises(DataError, match=message):
        train_tokenizer(inputs, vocab_size, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_sentencepiece_model(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    lines = [line for line in SAMPLE.read_text()[:30_000].splitlines() if line.strip()]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=300, model_type="bpe", minloglevel=2)
    text = "First Citizen: we know't, we know't."
    for path in (tmp_path / "sp.model", _dir_with(tmp_path / "sp.model", tmp_path / "spdir")):
        tok = Tokenizer.load(path)
        assert tok.vocab_size == 300
        assert (tok.eod_id, tok.bos_id, tok.pad_id) == (2, 1, 2)  # SentencePiece defaults; pad falls back to eod
        assert tok.special_tokens == {"eod": "</s>", "bos": "<s>"}
        ids = tok.encode(text)
        assert ids and tok.bos_id not in ids and tok.eod_id not in ids
        assert tok.decode(ids) == text
        assert tok.encode_batch([text, "All:"]) == [ids, tok.encode("All:")]
    tok.save(tmp_path / "saved")
    assert Tokenizer.load(tmp_path / "saved").encode(text) == ids


def _dir_with(model_file: Path, directory: Path) -> Path:
    directory.mkdir()
    shutil.copyfile(model_file, directory / "tokenizer.model")
    return directory


def _write_hf_dir(directory: Path, config: dict | None) -> dict[str, int]:
    """A tiny word-level tokenizer.json with some special tokens, like a downloaded HF model has."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "hello", "world"])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    directory.mkdir()
    hf.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


def test_hf_directory_with_config(tmp_path):
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    vocab = _write_hf_dir(tmp_path / "hf", {
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "special": True},
        "bos_token": "<s>", "pad_token": None, "chat_template": template})
    tok = Tokenizer.load(tmp_path / "hf")
    assert (tok.eod_id, tok.bos_id, tok.pad_id) == (vocab["<|im_end|>"], vocab["<s>"], vocab["<|im_end|>"])
    assert tok.chat_template == template
    assert tok.special_tokens == {"eod": "<|im_end|>", "bos": "<s>"}
    assert tok.encode("hello world <|im_end|>") == [5, 6, 4]
    assert Tokenizer.load(tmp_path / "hf" / "tokenizer.json").eod_id == 4  # the file itself works too


def test_hf_directory_without_config_guesses_eos(tmp_path):
    _write_hf_dir(tmp_path / "hf", None)
    tok = Tokenizer.load(tmp_path / "hf")
    assert (tok.eod_id, tok.bos_id, tok.chat_template) == (2, None, None)


def test_hf_chat_template_from_named_list_or_jinja_file(tmp_path):
    _write_hf_dir(tmp_path / "a", {"eos_token": "</s>", "chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]})
    assert Tokenizer.load(tmp_path / "a").chat_template == "DEFAULT"
    _write_hf_dir(tmp_path / "b", {"eos_token": "</s>"})
    (tmp_path / "b" / "chat_template.jinja").write_text("FROM FILE")
    assert Tokenizer.load(tmp_path / "b").chat_template == "FROM FILE"


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found: .*nowhere"):
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no tokenizer.json or tokenizer.model"):
        Tokenizer.load(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="broken/tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "broken")
    _write_hf_dir(tmp_path / "hf", {"eos_token": "<|eot|>"})
    with pytest.raises(DataError, match=r"hf: special token eod='<\|eot\|>' is not in the vocabulary"):
        Tokenizer.load(tmp_path / "hf")
