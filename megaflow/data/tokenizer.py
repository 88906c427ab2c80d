"""One `Tokenizer` over HF `tokenizers` (tokenizer.json) and SentencePiece (.model) files, and a BPE trainer.

Every later stage needs the same few things from a tokenizer: ids for text and back, the end-of-document,
padding and begin-of-text ids, and a chat template. This module gives them one shape whatever the file
format, and reads/writes `tokenizer_config.json` the way Hugging Face does, so a megaflow tokenizer
directory also loads with `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from megaflow.data.readers import ReadStats, expand_inputs, iter_documents
from megaflow.errors import DataError

# Reserved at ids 0..6 of every tokenizer megaflow trains, so SFT chat formatting never grows the vocabulary.
SPECIAL_TOKENS = {
    "eod": "<|endoftext|>",  # end of document; the eos token
    "pad": "<|pad|>",
    "bos": "<|begin_of_text|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end_of_turn": "<|end_of_turn|>",
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end_of_turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Our special-token names and the tokenizer_config.json keys Hugging Face keeps them under.
_CONFIG_KEYS = {"eod": "eos_token", "pad": "pad_token", "bos": "bos_token"}
# Tried in order when a tokenizer.json comes without a config naming its eos token.
_LIKELY_EOD = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class _HFBackend:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, directory: Path) -> None:
        self.tokenizer.save(str(directory / "tokenizer.json"))


class _SentencePieceBackend:
    def __init__(self, processor, model_file: Path):
        self.processor, self.model_file = processor, model_file

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        i = self.processor.piece_to_id(token)
        return None if self.processor.is_unknown(i) and self.processor.id_to_piece(i) != token else i

    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def save(self, directory: Path) -> None:
        shutil.copyfile(self.model_file, directory / "tokenizer.model")


class Tokenizer:
    """Text <-> ids plus the special tokens megaflow needs. Build with `Tokenizer.load` or `train_tokenizer`."""

    def __init__(self, backend, special_tokens: dict[str, str], chat_template: str | None, path: str,
                 config: dict[str, Any] | None = None):
        self._backend, self._config, self._chat_template = backend, dict(config or {}), chat_template
        self.path = path  # what it was loaded from: Tokenizer.load(path) gives it again
        self._special_tokens = dict(special_tokens)
        self._special_ids = {name: backend.token_to_id(token) for name, token in special_tokens.items()}
        for name, token_id in self._special_ids.items():
            if token_id is None:
                raise DataError(f"{path}: special token {name}={special_tokens[name]!r} is not in the vocabulary")
        if "eod" not in self._special_ids:
            raise DataError(f"{path}: no end-of-document token (set eos_token in tokenizer_config.json)")

    # --- loading and saving ---------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a directory with tokenizer.json (or tokenizer.model), or a tokenizer.json / .model file."""
        source, path = str(path), Path(path)
        if not path.exists():
            raise DataError(f"tokenizer not found: {path}")
        directory = path if path.is_dir() else path.parent
        if path.is_dir():
            path = next((f for f in (path / "tokenizer.json", path / "tokenizer.model") if f.is_file()), None)
            if path is None:
                raise DataError(f"{directory}: no tokenizer.json or tokenizer.model in this directory")
        config = _read_config(directory)
        if path.suffix == ".json":
            backend = _load_hf(path)
        elif path.suffix == ".model":
            backend = _load_sentencepiece(path)
        else:
            raise DataError(f"{path}: not a tokenizer file (expected tokenizer.json or a SentencePiece .model)")
        special_tokens = _special_tokens_from(config, backend)
        return cls(backend, special_tokens, _chat_template_from(config, directory), source, config)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the vocabulary file and a Hugging Face style tokenizer_config.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(directory)
        config = dict(self._config)
        config.pop("chat_template", None)
        for name, key in _CONFIG_KEYS.items():
            if name in self._special_tokens:
                config[key] = self._special_tokens[name]
        extra = [t for n, t in self._special_tokens.items() if n not in _CONFIG_KEYS]
        if extra:
            config["additional_special_tokens"] = extra
        if isinstance(self._backend, _HFBackend):
            config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
            config.setdefault("clean_up_tokenization_spaces", False)
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # --- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with no special tokens added (documents get their eod from the caller)."""
        try:
            return self._backend.encode(text)
        except (TypeError, UnicodeEncodeError):  # surrogate escapes: undecodable bytes from argv or stdin
            return self._backend.encode(_valid_unicode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return self._backend.encode_batch(list(texts))
        except (TypeError, UnicodeEncodeError):
            return self._backend.encode_batch([_valid_unicode(t) for t in texts])

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in ids])

    # --- what later stages ask about --------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included (pad it with models.size.padded_vocab_size)."""
        return self._backend.vocab_size()

    @property
    def eod_id(self) -> int:
        return self._special_ids["eod"]

    @property
    def pad_id(self) -> int:
        """The pad token's id, or the eod id when the tokenizer has no pad token (labels mask it anyway)."""
        return self._special_ids.get("pad", self.eod_id)

    @property
    def bos_id(self) -> int | None:
        return self._special_ids.get("bos")

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        """Name -> token string, names as in SPECIAL_TOKENS (only those this tokenizer has)."""
        return dict(self._special_tokens)

    def token_id(self, name: str) -> int:
        """Id of a special token by name ('eod', 'user', ...); KeyError if this tokenizer lacks it."""
        return self._special_ids[name]

    def with_special_tokens(self, tokens: dict[str, str], chat_template: str | None = None) -> Tokenizer:
        """A copy with `tokens` (name -> token string, names as in SPECIAL_TOKENS) added where the vocabulary
        lacks them, as new ids after the existing ones, and `chat_template` if given.

        SFT on a tokenizer without a chat template uses megaflow's built-in one, whose role tokens must be
        single tokens; the model's embedding then grows to the new vocab_size. Only tokenizer.json
        tokenizers can grow: a SentencePiece model cannot take new pieces without rewriting its file.
        The copy's `path` still names the original files, which lack the new tokens: save the copy before
        giving it to anything that reloads a tokenizer by path."""
        special, template = {**self._special_tokens, **tokens}, chat_template or self._chat_template
        missing = [t for t in tokens.values() if self._backend.token_to_id(t) is None]
        if not missing:
            return Tokenizer(self._backend, special, template, self.path, self._config)
        if not isinstance(self._backend, _HFBackend):
            raise DataError(f"{self.path}: cannot add special tokens {missing} to a SentencePiece tokenizer; "
                            "give a tokenizer.json, or a chat template that uses the tokenizer's own tokens")
        from tokenizers import AddedToken, Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(self._backend.tokenizer.to_str())
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        return Tokenizer(_HFBackend(hf), special, template, self.path, self._config)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


def _load_hf(path: Path) -> _HFBackend:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return _HFBackend(HFTokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def _load_sentencepiece(path: Path) -> _SentencePieceBackend:
    import sentencepiece

    try:
        return _SentencePieceBackend(sentencepiece.SentencePieceProcessor(model_file=str(path)), path)
    except (OSError, RuntimeError) as e:
        raise DataError(f"{path}: not a valid SentencePiece model ({str(e).splitlines()[0]})") from None


def _read_config(directory: Path) -> dict[str, Any]:
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise DataError(f"{config_file}: expected a JSON object")
    return config


def _token_content(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ..., ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _special_tokens_from(config: dict[str, Any], backend) -> dict[str, str]:
    tokens = {name: _token_content(config.get(key)) for name, key in _CONFIG_KEYS.items()}
    if tokens["eod"] is None:
        if isinstance(backend, _SentencePieceBackend) and backend.processor.eos_id() >= 0:
            tokens["eod"] = backend.processor.id_to_piece(backend.processor.eos_id())
        else:
            tokens["eod"] = next((t for t in _LIKELY_EOD if backend.token_to_id(t) is not None), None)
    if tokens["bos"] is None and isinstance(backend, _SentencePieceBackend) and backend.processor.bos_id() >= 0:
        tokens["bos"] = backend.processor.id_to_piece(backend.processor.bos_id())
    for name, token in SPECIAL_TOKENS.items():  # megaflow's chat tokens, when the vocabulary has them
        if name not in _CONFIG_KEYS and backend.token_to_id(token) is not None:
            tokens[name] = token
    return {name: token for name, token in tokens.items() if token is not None}


def _chat_template_from(config: dict[str, Any], directory: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return template


# --- training ---------------------------------------------------------------------------------------


def train_tokenizer(inputs: list[str], vocab_size: int, output: str, field: str = "text") -> Tokenizer:
    """Train a byte-level BPE on local files and write it to `output` atomically; returns it loaded back.

    Byte-level means every string encodes and decode(encode(x)) == x; the special tokens come first
    (ids 0..6) and the chat template uses them.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    inputs = expand_inputs(list(inputs))  # a directory: its data files (a curate stage's shards)
    if not inputs:
        raise DataError("tokenizer training needs at least one input file")
    smallest = 256 + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise DataError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {smallest} "
                        f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")
    output = Path(output)
    _check_replaceable(output)

    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    stats = ReadStats()
    bpe.train_from_iterator((doc for path in inputs for doc in iter_documents(path, field, stats=stats)),
                            trainer=trainer)
    if stats.documents == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: no documents (empty corpus)")

    trained = Tokenizer(_HFBackend(bpe), SPECIAL_TOKENS, CHAT_TEMPLATE, str(output))
    temporary = output.parent / f".{output.name}.tmp-{os.getpid()}"
    try:
        trained.save(temporary)
        _move_into_place(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return Tokenizer.load(output)


def _check_replaceable(output: Path) -> None:
    """Refuse to replace anything but an empty or tokenizer directory: `output` may be a typo for a run dir."""
    if output.exists() and not output.is_dir():
        raise DataError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not any(
            (output / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise DataError(f"{output}: exists and is not a tokenizer directory; refusing to replace it")


def _move_into_place(temporary: Path, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if not output.exists():
        os.rename(temporary, output)
        return
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    os.rename(output, old)
    os.rename(temporary, output)
    shutil.rmtree(old)


def _valid_unicode(text: str) -> str:
    """`text` with lone surrogates (Python's escapes for bytes that are not UTF-8, as in a command line or
    a terminal in another encoding) replaced by U+FFFD, as files' invalid bytes are."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(text, str) else text
