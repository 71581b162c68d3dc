"""Tokenizers for the LLaMA example: text <-> ids, nothing downloaded at run time.

Tokenizers (``load_tokenizer``): ``bytes`` (UTF-8 bytes, 260 ids), ``t5-base`` (from a
local path or the local Hugging Face cache only), a path to a ``tokenizer.json`` or a
saved tokenizer directory, ``bpe`` (a byte-level BPE trained on the source and cached
on disk) and ``auto`` (t5-base when cached, else bpe).  ``encode_batch`` appends the
end-of-document id to every document.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from examples.llama.data.sources import Source, digest

BPE_TRAIN_CHARS = 20_000_000  # the BPE is trained on at most this much train text
MIN_BPE_VOCAB = 259  # a byte-level BPE's fixed ids: 256 bytes + 3 specials
# The specs whose vocabulary load_tokenizer's vocab_size sizes (auto: where it trains a BPE,
# t5-base not being cached); the others have their own.
SIZED_TOKENIZERS = ("bpe", "auto")

# Help string for argparse (which %-formats it: "%%" prints "%").
TOKENIZER_HELP = (
    "auto (t5-base if in the local HF cache, else bpe), t5-base (the papers'; local cache "
    "or path only), bpe (byte-level BPE trained on --data, cached), bytes (260 ids), or a "
    "path to a tokenizer.json / saved tokenizer directory")


@dataclasses.dataclass(eq=False)
class Tokenizer:
  """Text <-> ids.  ``encode_batch`` encodes each document as text (one that spells a special
  token gets no special id) and appends ``eos_id``; ``decode`` drops special tokens.  Backed
  by UTF-8 bytes (``hf`` None) or a ``tokenizers.Tokenizer``.
  """

  name: str
  vocab_size: int
  pad_id: int
  eos_id: int
  bos_id: int | None = None
  hf: object = dataclasses.field(default=None, repr=False)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, with EOS appended."""
    if self.hf is None:
      return [list(t.encode("utf-8")) + [self.eos_id] for t in texts]
    encodings = self.hf.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids + [self.eos_id] for e in encodings]

  def identity(self) -> str:
    """What the ids mean, as a digest: the byte map's name, or the tokenizer's whole
    definition (vocabulary, merges, special tokens); equal for the same tokenizer however it
    was named or found (``auto`` or ``bpe``, a cache or a path)."""
    spec = self.hf.to_str() if self.hf is not None else self.name
    return digest(f"{spec}|{self.vocab_size}|{self.pad_id}|{self.eos_id}|{self.bos_id}")

  def decode(self, ids) -> str:
    """The text of ``ids``, special tokens dropped."""
    ids = [int(i) for i in ids]
    if self.hf is None:
      return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
    return self.hf.decode(ids, skip_special_tokens=True)


def bytes_tokenizer() -> Tokenizer:
  """Ids 0..255 are the UTF-8 bytes; pad 256, bos 257, eos 258, 259 reserved."""
  return Tokenizer("bytes", vocab_size=260, pad_id=256, eos_id=258, bos_id=257)


_SPECIAL_GUESSES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "eos": ("</s>", "<|endoftext|>", "<eos>", "<|eos|>", "<|end_of_text|>"),
    "bos": ("<s>", "<bos>", "<|bos|>", "<|startoftext|>", "<|begin_of_text|>"),
}


def _wrap_hf(tok, name: str, configured: Mapping[str, str | None] = ()) -> Tokenizer:
  """A ``Tokenizer`` around a ``tokenizers.Tokenizer``: pad/eos/bos from ``configured``
  (role -> token string, from a saved config), else guessed among its special tokens."""
  tok.no_truncation()
  tok.no_padding()
  # Documents are raw text: a "<pad>", "</s>" or "<extra_id_0>" in one is text, not a special
  # id (a pad masked out of the loss, an end of document mid-document, or t5-base's sentinels,
  # ids 32000..32099, past the papers' 32,000-row embedding).
  tok.encode_special_tokens = True
  specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
  ids = {}
  for role, guesses in _SPECIAL_GUESSES.items():
    names = [dict(configured).get(role)] + [g for g in guesses if g in specials]
    ids[role] = next((i for i in map(tok.token_to_id, filter(None, names)) if i is not None), None)
  if ids["eos"] is None:
    raise ValueError(f"tokenizer {name!r}: no end-of-document token (looked for "
                     f"{', '.join(_SPECIAL_GUESSES['eos'])})")
  if ids["pad"] is None:
    warnings.warn(f"tokenizer {name!r} has no pad token: padding with eos (so eos targets "
                  "are masked too)", stacklevel=3)
    ids["pad"] = ids["eos"]
  return Tokenizer(name, vocab_size=tok.get_vocab_size(with_added_tokens=True),
                   pad_id=ids["pad"], eos_id=ids["eos"], bos_id=ids["bos"], hf=tok)


def _configured_specials(d: Path) -> dict[str, str]:
  out = {}
  for fname in ("special_tokens_map.json", "tokenizer_config.json"):
    try:
      cfg = json.loads((d / fname).read_text(encoding="utf-8"))
    except (OSError, ValueError):
      continue
    for role in ("pad", "eos", "bos"):
      v = cfg.get(f"{role}_token")
      v = v.get("content") if isinstance(v, dict) else v
      if isinstance(v, str):
        out.setdefault(role, v)
  return out


def _load_path(path: Path, name: str) -> Tokenizer:
  """A tokenizer saved on disk: a tokenizer.json, a directory holding one, or (through
  ``transformers``, local files only) any directory ``save_pretrained`` wrote."""
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel

  file = path if path.is_file() else path / "tokenizer.json"
  if file.is_file():
    try:
      tok = HFTokenizer.from_file(str(file))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"tokenizer {name!r}: cannot load {file}: {e}") from e
    return _wrap_hf(tok, name, _configured_specials(file.parent))
  try:
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    t = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    backend = t.backend_tokenizer
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"tokenizer {name!r}: {path} holds no tokenizer.json and transformers "
                     f"cannot load it as a fast tokenizer ({type(e).__name__}: {e})") from e
  return _wrap_hf(backend, name, {"pad": t.pad_token, "eos": t.eos_token, "bos": t.bos_token})


def _hub_cache() -> Path:
  """The Hugging Face hub cache directory, read from the environment now."""
  env = os.environ
  if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
    return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
  home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
  return Path(home).expanduser() / "hub"


T5_REPOS = ("google-t5/t5-base", "t5-base")


def _find_t5() -> Path | None:
  """A snapshot of t5-base in the local HF cache holding its tokenizer, or None: one with a
  tokenizer.json (``refs/main``'s first), else one with only the sentencepiece model where
  ``sentencepiece`` is installed to convert it (without it, such a snapshot does not count:
  ``auto`` takes the BPE rather than fail)."""
  cache = _hub_cache()
  snaps = []
  for repo in T5_REPOS:
    model = cache / f"models--{repo.replace('/', '--')}"
    ref = model / "refs" / "main"
    snaps += [model / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    snaps += sorted((model / "snapshots").glob("*"))
  files = ["tokenizer.json"] + (["spiece.model"] if importlib.util.find_spec("sentencepiece")
                                else [])
  for f in files:
    for snap in snaps:
      if (snap / f).is_file():
        return snap
  return None


def _load_t5() -> Tokenizer:
  snap = _find_t5()
  if snap is None:
    raise FileNotFoundError(
        f"the t5-base tokenizer is not in the local Hugging Face cache ({_hub_cache()}); "
        "nothing is downloaded at run time.  Download it once with network: "
        "`huggingface-cli download google-t5/t5-base tokenizer.json` (or "
        "`python -c \"import transformers as t; t.AutoTokenizer.from_pretrained('t5-base')\"`), "
        "or pass a local path to its tokenizer.json / directory, or use --tokenizer bpe "
        "(trained on the data) or bytes.")
  return _load_path(snap, "t5-base")


def _slug(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_.")[-60:] or "source"


def _train_bpe(texts: Iterator[str], vocab_size: int):
  """A byte-level BPE (specials <pad>=0, <s>=1, </s>=2) trained on ``texts``."""
  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok


def _capped(texts: Iterator[str], max_chars: int) -> Iterator[str]:
  total = 0
  for t in texts:
    if total >= max_chars:
      return
    total += len(t)
    yield t


def _bpe(source: Source | None, vocab_size: int, cache_dir) -> Tokenizer:
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel

  if source is None:
    raise ValueError("the bpe tokenizer is trained on the data: pass source=")
  if vocab_size < MIN_BPE_VOCAB:
    raise ValueError(f"a byte-level BPE needs vocab_size >= {MIN_BPE_VOCAB} (256 bytes + 3 "
                     f"specials), got {vocab_size}")
  cache = Path(cache_dir or "~/.cache/galore_jax/tokenizers").expanduser()
  key = digest(f"bpe-v1|{source.fingerprint}|{vocab_size}|{BPE_TRAIN_CHARS}")[:16]
  path = cache / f"bpe-{_slug(source.name)}-{vocab_size}-{key}.json"
  name = f"bpe-{vocab_size}({source.name})"
  tok = None
  if path.is_file():
    try:
      tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"retraining the BPE: cannot load the cached {path}: {e}", stacklevel=2)
  if tok is None:
    tok = _train_bpe(_capped(source.documents("train"), BPE_TRAIN_CHARS), vocab_size)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
  if tok.get_vocab_size() < vocab_size:  # (its name keeps the size asked: runs record it)
    warnings.warn(f"data source {source.name!r}: the BPE has {tok.get_vocab_size()} tokens,"
                  f" fewer than vocab_size={vocab_size} (too little data)", stacklevel=2)
  return _wrap_hf(tok, name)


def auto_spec() -> str:
  """What ``--tokenizer auto`` loads on this machine: "t5-base" where the local Hugging Face
  cache holds its tokenizer, else "bpe"."""
  return "t5-base" if _find_t5() is not None else "bpe"


def load_tokenizer(spec: str, *, source: Source | None = None, vocab_size: int = 32000,
                   cache_dir: str | Path | None = None) -> Tokenizer:
  """The tokenizer named by ``spec`` (see ``TOKENIZER_HELP``).  Nothing is downloaded.

  Args:
    spec: "auto", "t5-base", "bpe", "bytes", or a path to a tokenizer.json / a directory
      written by ``tokenizer.save`` or ``save_pretrained``.
    source: the data the "bpe" tokenizer is trained on (its train split, capped at
      ``BPE_TRAIN_CHARS`` characters).
    vocab_size: of the "bpe" tokenizer (the others have their own).
    cache_dir: where trained BPEs are kept (default ~/.cache/galore_jax/tokenizers),
      keyed by source name, source fingerprint and vocab size.
  """
  if spec == "bytes":
    return bytes_tokenizer()
  if spec in T5_REPOS:
    return _load_t5()
  if spec == "bpe":
    return _bpe(source, vocab_size, cache_dir)
  if spec == "auto":
    if auto_spec() == "t5-base":
      return _load_t5()
    if source is None:
      raise ValueError("tokenizer 'auto': t5-base is not in the local Hugging Face cache, and "
                       "there is no source to train a BPE on")
    return _bpe(source, vocab_size, cache_dir)
  path = Path(spec).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"tokenizer {spec!r}: no such file or directory: {path} (choose "
                            "auto, t5-base, bpe, bytes or a path to a saved tokenizer)")
  return _load_path(path, spec)
