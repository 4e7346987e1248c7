"""Caption tokenizers in the Hugging Face CLIP format.

`train_tokenizer` learns a byte-level BPE on a caption set with the `tokenizers` library and saves it
as a CLIP tokenizer directory; `Tokenizer` loads any such directory (ours, or a published CLIP one)
through `transformers.CLIPTokenizerFast` and turns captions into fixed-length id arrays.

Vocabulary layout (the OpenAI CLIP one): the 256 byte symbols, the same 256 with the end-of-word
suffix `</w>`, the learned merges in order, then `<|startoftext|>` and `<|endoftext|>` last. So the
EOT token has the highest id and "argmax" EOT pooling works. Padding uses `<|endoftext|>` as well
(as Hugging Face's CLIP tokenizers do): every position after the first EOT holds the EOT id, and
both pooling modes find the first one.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOT_TOKEN
END_OF_WORD = "</w>"
_NUM_BYTES = 256
MIN_VOCAB_SIZE = 2 * _NUM_BYTES + 2  # bytes, bytes + "</w>", two special tokens

# CLIP's pre-tokenisation (also what `transformers.CLIPTokenizer` builds): special tokens,
# English contractions, runs of letters, single digits, runs of other non-space symbols.
_SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                  r"""[\p{N}]|[^\s\p{L}\p{N}]+""")


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of byte-level BPE (GPT-2 / CLIP order)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(_NUM_BYTES):
        if b not in table:
            table[b] = chr(_NUM_BYTES + extra)
            extra += 1
    return table


def _pipeline(tokenizer: Any) -> None:
    """Sets CLIP's normaliser and pre-tokeniser on a `tokenizers.Tokenizer`."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])


def _learn_merges(captions: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Runs the `tokenizers` BPE trainer and returns its first `num_merges` merges, in order."""
    from tokenizers import Tokenizer as HFTokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE

    if num_merges == 0:
        return []
    bpe = HFTokenizer(BPE(unk_token=None, continuing_subword_prefix="",
                          end_of_word_suffix=END_OF_WORD, fuse_unk=False))
    _pipeline(bpe)
    trainer = trainers.BpeTrainer(
        # The trainer counts its alphabet (<= 512 symbols with the suffixed ones) in vocab_size.
        vocab_size=num_merges + 2 * _NUM_BYTES, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix=END_OF_WORD,
        continuing_subword_prefix="")
    bpe.train_from_iterator((str(c) for c in captions), trainer=trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return pairs[:num_merges]


def train_tokenizer(captions: Iterable[str], out_dir: str, vocab_size: int = 1024) -> None:
    """Trains a byte-level BPE on `captions` and saves it as a Hugging Face CLIP tokenizer.

    Writes vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json into `out_dir` (created if needed). The vocabulary holds at most
    `vocab_size` entries (fewer when the captions allow fewer merges); see the module docstring for
    its layout. Deterministic: the same captions give the same files.
    """
    from transformers import CLIPTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level CLIP vocabulary needs "
                         f"at least {MIN_VOCAB_SIZE} entries (2 x 256 byte symbols + 2 special "
                         "tokens)")
    merges = _learn_merges(captions, vocab_size - MIN_VOCAB_SIZE)

    symbols = list(bytes_to_unicode().values())
    ordered = symbols + [s + END_OF_WORD for s in symbols] + ["".join(pair) for pair in merges]
    vocab: dict[str, int] = {}
    for token in ordered:
        vocab.setdefault(token, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOT_TOKEN] = len(vocab)

    os.makedirs(out_dir, exist_ok=True)
    hf = CLIPTokenizerFast(vocab=vocab, merges=[tuple(pair) for pair in merges],
                           bos_token=BOS_TOKEN, eos_token=EOT_TOKEN, unk_token=EOT_TOKEN,
                           pad_token=PAD_TOKEN)
    hf.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(" ".join(pair) + "\n" for pair in merges)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN,
               "pad_token": PAD_TOKEN}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2, sort_keys=True)


def _check_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    files = set(os.listdir(path))
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise FileNotFoundError(
            f"tokenizer directory {path!r} holds neither tokenizer.json nor vocab.json + "
            f"merges.txt (found: {sorted(files)})")


class Tokenizer:
    """Captions -> int32 [batch, context_length] ids: `<|startoftext|> ... <|endoftext|>` + padding.

    Wraps a `transformers.CLIPTokenizerFast` loaded from a local directory. Captions that do not
    fit are truncated (the EOT token stays last) with one warning per call. Picklable: the state is
    the directory and the context length, and unpickling reloads from the directory.
    """

    def __init__(self, path: str, context_length: int = 77):
        """Loads the tokenizer in directory `path` (see `from_dir`)."""
        from tokenizers import Tokenizer as HFTokenizer
        from transformers import CLIPTokenizerFast

        if int(context_length) < 2:
            raise ValueError(f"context_length={context_length} must be at least 2 "
                             "(start and end tokens)")
        path = os.path.abspath(os.path.expanduser(path))
        _check_dir(path)
        self._path = path
        self._context_length = int(context_length)
        self._hf = CLIPTokenizerFast.from_pretrained(path, local_files_only=True)
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self._hf, name) is None:
                raise ValueError(f"tokenizer in {path!r} has no {name.replace('_id', '')}")
        # A private copy of the Rust tokenizer with our truncation/padding, so that the shared
        # HF object keeps its own settings and the per-call overflow tells what was truncated.
        self._encoder = HFTokenizer.from_str(self._hf.backend_tokenizer.to_str())
        self._encoder.enable_truncation(max_length=self._context_length)
        self._encoder.enable_padding(length=self._context_length, pad_id=self.pad_token_id,
                                     pad_token=self._hf.convert_ids_to_tokens(self.pad_token_id))

    @classmethod
    def from_dir(cls, path: str, context_length: int = 77) -> "Tokenizer":
        """Loads a Hugging Face CLIP tokenizer directory; a missing directory or files raise a
        `FileNotFoundError` naming `path`."""
        return cls(path, context_length)

    @property
    def path(self) -> str:
        return self._path

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the text tower's embedding rows)."""
        return len(self._hf)

    @property
    def bos_token_id(self) -> int:
        return int(self._hf.bos_token_id)

    @property
    def eot_token_id(self) -> int:
        return int(self._hf.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self._hf.pad_token_id
        return self.eot_token_id if pad is None else int(pad)

    @property
    def eot_pooling(self) -> str:
        """"argmax" when EOT has the highest id (OpenAI layout), else "eot_id"."""
        return "argmax" if self.eot_token_id == self.vocab_size - 1 else "eot_id"

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        """captions: a sequence of B strings (bytes are decoded as UTF-8) -> int32 [B, context_length]."""
        if isinstance(captions, (str, bytes)):
            raise TypeError("captions must be a sequence of strings, got a single string; "
                            "wrap it in a list")
        texts = [c.decode("utf-8") if isinstance(c, (bytes, np.bytes_)) else str(c)
                 for c in captions]
        if not texts:
            return np.zeros((0, self._context_length), np.int32)
        encodings = self._encoder.encode_batch(texts, add_special_tokens=True)
        truncated = sum(1 for e in encodings if e.overflowing)
        if truncated:
            logger.warning("%d of %d captions were longer than the context length %d and were "
                           "truncated (the end-of-text token is kept last)", truncated, len(texts),
                           self._context_length)
        return np.asarray([e.ids for e in encodings], dtype=np.int32)

    def decode(self, tokens: Any) -> list[str]:
        """int ids [B, L] -> B captions, special tokens and padding removed."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens have shape {tokens.shape}; expected [batch, length]")
        return [self._hf.decode(row.tolist(), skip_special_tokens=True) for row in tokens]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self._path, "context_length": self._context_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["context_length"])

    def __repr__(self) -> str:
        return (f"Tokenizer(path={self._path!r}, context_length={self._context_length}, "
                f"vocab_size={self.vocab_size})")
