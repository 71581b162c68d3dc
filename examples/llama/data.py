"""Text, tokenizers and batches for the LLaMA example.

The papers' protocol (reference/galore.md 2.2): C4 "en", the ``t5-base`` tokenizer,
every document tokenized and truncated or right-padded to 256 tokens (pad masked
out of the loss, no packing), the train split shuffled with a seed, and evaluation
on a fixed budget of non-pad tokens from the validation split.

Sources (``resolve_source``; the CLI prints ``SOURCE_HELP``):
  default         the embedded corpus: the Python sources (``*.py``) and docs
                  (``*.txt``, ``*.rst``) of the running interpreter's standard
                  library, without ``site-packages`` and test directories.  Files
                  are taken in sorted relative-path order; ~5% of them (by a stable
                  hash of the path) are the validation split.
  <dir>, c4:<dir> C4 as published (``c4-train.*.json.gz``, ``c4-validation.*.json.gz``,
                  one JSON object with a "text" field per line; ``<dir>/en`` also
                  works).  A corrupt shard is skipped with a warning and counted in
                  ``Source.skipped``.
  hf:<name>[:<config>]
                  a Hugging Face dataset, streamed (``datasets.load_dataset(...,
                  streaming=True)``; needs network or a local cache).  For the
                  packaged builders (json, text, csv, parquet, arrow) the part after
                  the name is ``data_files``: ``hf:json:/data/*.jsonl``.  Without a
                  validation split ~5% of train (by a hash of the text) is used.
  <file or dir>   local ``.txt``, ``.jsonl``, ``.json`` (JSON lines or one JSON list),
                  ``.json.gz``/``.jsonl.gz`` files.  A ``.txt`` file holds one
                  document per blank-line-separated block; JSON holds objects with a
                  "text" field.  Files whose relative path has a word val / valid /
                  validation / eval are the validation split; without such files
                  ~5% of the documents (by a hash of the text) are.

Every ``.txt`` block and every file of the default corpus is cut at line boundaries
into documents of at most ``MAX_DOC_CHARS`` characters, so that truncation to 256
tokens keeps most of the text; JSON documents are used whole, as in C4.

Tokenizers (``load_tokenizer``): ``bytes`` (UTF-8 bytes, 260 ids), ``t5-base`` (from a
local path or the local Hugging Face cache only), a path to a ``tokenizer.json`` or a
saved tokenizer directory, ``bpe`` (a byte-level BPE trained on the source and cached
on disk) and ``auto`` (t5-base when cached, else bpe).  ``encode_batch`` appends the
end-of-document id to every document.

Batches: ``Batches`` shuffles the train documents with a seeded, hash-based
permutation of consecutive windows of ``shuffle_window`` documents (a corpus smaller
than the window is fully permuted, differently every epoch) and is resumable from a
small JSON ``state()``.  ``eval_batches`` reads the validation split in order.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import json
import os
import re
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

SPLITS = ("train", "validation")
VALID_FRACTION = 0.05  # of files (default corpus) or documents (hash split)
MAX_DOC_CHARS = 2000  # documents cut from text files are at most this long
BPE_TRAIN_CHARS = 20_000_000  # the BPE is trained on at most this much train text
SHUFFLE_WINDOW = 8192  # documents permuted together
ENCODE_CHUNK = 256  # documents tokenized per encode_batch call

# Help strings for argparse (which %-formats them: "%%" prints "%").
SOURCE_HELP = (
    "training text: 'default' (the Python standard library's sources and docs, embedded; "
    "~5%% of the files are validation), a C4 directory ('c4:DIR' or DIR holding "
    "c4-train.*.json.gz / c4-validation.*.json.gz), 'hf:NAME[:CONFIG]' (a Hugging Face "
    "dataset, streamed; 'hf:json:GLOB' for local JSON files), or a local .txt (one document "
    "per blank-line-separated block) / .jsonl / .json / .json.gz file or a directory of "
    "them (files whose path has the word val, valid, validation or eval, e.g. "
    "c4-validation.0.json.gz or eval/part1.jsonl, are the validation split: not 'evaluation' "
    "or 'dev'; without such files ~5%% of the documents by hash)")
TOKENIZER_HELP = (
    "auto (t5-base if in the local HF cache, else bpe), t5-base (the papers'; local cache "
    "or path only), bpe (byte-level BPE trained on --data, cached), bytes (260 ids), or a "
    "path to a tokenizer.json / saved tokenizer directory")

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_DEFAULT_SUFFIXES = (".py", ".txt", ".rst")
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".json.gz", ".jsonl.gz")
_VALID_RE = re.compile(r"(?<![a-z])(val|valid|validation|eval)(?![a-z])", re.IGNORECASE)
_HF_PACKAGED = ("json", "text", "csv", "parquet", "arrow")

# A shard reader: (source, start item) -> (item, text) for every item >= start.
Reader = Callable[["Source", int], Iterator[tuple[int, str]]]


def _digest(s: str) -> str:
  return hashlib.blake2b(s.encode("utf-8"), digest_size=16).hexdigest()


def _unit(key: str) -> float:
  """A stable hash of ``key`` in [0, 1): the same on every machine and run."""
  h = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(h, "big") / 2.0**64


def _check_split(split: str):
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# --------------------------------------------------------------------------- sources


class Source:
  """A text corpus with a train and a validation split.

  Attributes:
    name: what it is (in messages and in the BPE cache key).
    fingerprint: changes whenever the documents may (BPE cache key).
    max_docs: cap on the documents of each split, or None.
    skipped: corrupt shards / files skipped so far (each warned about once).
  """

  def __init__(self, name: str, fingerprint: str, shards: Mapping[str, list[Reader]], *,
               max_docs: int | None = None):
    self.name, self.max_docs = name, max_docs
    self.fingerprint = _digest(f"{fingerprint}|max_docs={max_docs}")
    self._shards = dict(shards)
    self._bad: set[str] = set()

  def __repr__(self):
    return f"Source({self.name!r}, max_docs={self.max_docs})"

  @property
  def skipped(self) -> int:
    return len(self._bad)

  def documents(self, split: str) -> Iterator[str]:
    """The documents of ``split`` ("train" or "validation"), always in the same order."""
    for _, text in self._stream(split):
      yield text

  def _stream(self, split, cursor=(0, 0), n=0):
    """Documents of ``split`` from ``cursor`` = (shard, item), ``n`` of them already taken
    (for ``max_docs``); yields (cursor of the next document, text)."""
    _check_split(split)
    shards, (first, start), empty = self._shards[split], cursor, (tuple(cursor), n) == ((0, 0), 0)
    for s in range(first, len(shards)):
      if self.max_docs is not None and n >= self.max_docs:
        return
      for item, text in shards[s](self, start if s == first else 0):
        n, empty = n + 1, False
        yield (s, item + 1), text
        if self.max_docs is not None and n >= self.max_docs:
          return
    if empty:
      raise ValueError(f"data source {self.name!r} has no documents in its {split!r} split")

  def _corrupt(self, path, why):
    """Skip a corrupt shard (or the rest of it), warning once."""
    if str(path) not in self._bad:
      self._bad.add(str(path))
      warnings.warn(f"data source {self.name!r}: skipping corrupt {path}: {why}", stacklevel=2)


def resolve_source(spec: str, *, max_docs: int | None = None,
                   splits: Mapping[str, str] | None = None) -> Source:
  """The source named by ``spec`` (see the module docstring and ``SOURCE_HELP``).

  Args:
    spec: "default", "c4:<dir>", "hf:<name>[:<config>]", or a path.
    max_docs: at most this many documents per split (tests, quick runs).
    splits: for ``hf:`` sources, the dataset's split names for "train" and "validation".

  Raises FileNotFoundError for a missing path and ValueError for a split without
  documents (checked here for local sources, on first read for ``hf:``).
  """
  if max_docs is not None and max_docs < 1:
    raise ValueError(f"max_docs must be >= 1, got {max_docs}")
  if spec == "default":
    src = _default_source(max_docs)
  elif spec.startswith("hf:"):
    return _hf_source(spec, max_docs, {"train": "train", "validation": "validation",
                                       **(splits or {})})
  else:
    path = Path(spec[3:] if spec.startswith("c4:") else spec).expanduser()
    if not path.exists():
      hint = "" if "/" not in spec or spec.startswith(("/", ".", "~", "c4:")) else (
          f" (for a Hugging Face dataset use 'hf:{spec}')")
      raise FileNotFoundError(f"data source {spec!r}: no such file or directory: {path}{hint}")
    if spec.startswith("c4:") or (path.is_dir() and _c4_dir(path)):
      src = _c4_source(path, max_docs)
    else:
      src = _local_source(path, max_docs)
  for split in SPLITS:  # fail now, not mid-run, on an empty split
    next(src._stream(split), None)
  return src


def _chunks(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
  """``text`` cut at line boundaries into pieces of at most ``max_chars`` (longer lines
  are cut too); whitespace-only pieces are dropped."""
  out, piece, size = [], [], 0
  for line in text.splitlines(keepends=True):
    for part in (line[i:i + max_chars] for i in range(0, len(line), max_chars)):
      if size + len(part) > max_chars:
        out.append("".join(piece))
        piece, size = [], 0
      piece.append(part)
      size += len(part)
  out.append("".join(piece))
  return [doc for doc in out if doc.strip()]


def _blocks(text: str) -> Iterator[str]:
  """Blank-line-separated blocks of ``text``, each cut into ``_chunks``."""
  for block in re.split(r"\n[ \t\r\f\v]*\n", text):
    yield from _chunks(block.strip("\n"))


def _file_error(path, e: BaseException) -> Exception:
  if isinstance(e, UnicodeDecodeError):
    return ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
  if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile):
    return OSError(f"cannot read {path}: {e.strerror or e}")
  return ValueError(f"{path}: corrupt file ({type(e).__name__}: {e})")


def _open_text(path: Path):
  if path.name.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def _read_text(path: Path) -> str:
  try:
    with _open_text(path) as f:
      return f.read()
  except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
    raise _file_error(path, e) from e


def _read_chunks(src: Source, start: int, path: Path) -> Iterator[tuple[int, str]]:
  """A default-corpus file: ``_chunks`` of it; an unreadable file is skipped."""
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    src._corrupt(path, e)
    return
  yield from itertools.islice(enumerate(_chunks(text)), start, None)


def _read_txt(src: Source, start: int, path: Path) -> Iterator[tuple[int, str]]:
  """A local .txt file: one document per blank-line-separated block."""
  yield from itertools.islice(enumerate(_blocks(_read_text(path))), start, None)


def _json_text(obj):
  text = obj.get("text") if isinstance(obj, dict) else obj
  if not isinstance(text, str):
    raise ValueError('not a JSON object with a string "text" field')
  return text


def _read_json(src: Source, start: int, path: Path, strict: bool = True):
  """JSON lines (or, for ``.json``, one JSON list) of objects with a "text" field.  Errors
  raise naming the file when ``strict``, else (C4 shards) skip the bad line or the rest
  of the shard with a warning."""
  try:
    with _open_text(path) as f:
      if path.suffix == ".json":  # a JSON list, or JSON lines under a .json name
        head = f.read(4096)
        if head.lstrip().startswith("["):
          items = json.loads(head + f.read())
          if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of documents")
          for i, obj in itertools.islice(enumerate(items), start, None):
            try:
              text = _json_text(obj)
            except ValueError as e:
              raise ValueError(f"{path}: item {i}: {e}") from None
            if text.strip():
              yield i, text
          return
        f.seek(0)
      for i, line in enumerate(f):
        if i < start or not line.strip():
          continue
        try:
          text = _json_text(json.loads(line))
        except ValueError as e:
          if strict:
            raise ValueError(f"{path}:{i + 1}: {e}") from None
          src._corrupt(path, f"line {i + 1}: {e}")
          continue
        if text.strip():
          yield i, text
  except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
    if strict:
      raise _file_error(path, e) from e
    src._corrupt(path, f"{type(e).__name__}: {e}")


def _hash_split(reader: Reader, split: str) -> Reader:
  """Keep the documents of ``reader`` that a stable hash of their text puts in ``split``."""
  want = split == "validation"

  def read(src, start):
    for item, text in reader(src, start):
      if (_unit(text) < VALID_FRACTION) == want:
        yield item, text

  return read


def _listing_fingerprint(root: Path, files) -> str:
  return _digest("\n".join(f"{p.relative_to(root).as_posix()}:{_stat(p)}" for p in files))


def _stat(p: Path) -> str:
  try:
    st = p.stat()
  except OSError:
    return "?"
  return f"{st.st_size}:{int(st.st_mtime)}"


def _reader(fn, path, **kw) -> Reader:
  return lambda src, start: fn(src, start, path, **kw)


def _default_files() -> tuple[Path, dict[str, list[Path]]]:
  """The embedded corpus: (stdlib root, {split: files in sorted relative-path order})."""
  root = Path(sysconfig.get_paths()["stdlib"])
  rel = []
  for d, dirs, names in os.walk(root):
    dirs[:] = [x for x in dirs if x not in _SKIP_DIRS and not x.startswith(".")]
    for n in names:
      if n.endswith(_DEFAULT_SUFFIXES):
        rel.append(Path(d, n).relative_to(root).as_posix())
  files = {split: [] for split in SPLITS}
  for r in sorted(rel):
    files["validation" if _unit(r) < VALID_FRACTION else "train"].append(root / r)
  return root, files


def _default_source(max_docs):
  root, files = _default_files()
  if not any(files.values()):
    raise ValueError(f"data source 'default': no Python sources found under {root}")
  fp = f"default|{sys.version_info[:3]}|" + _listing_fingerprint(root, sum(files.values(), []))
  shards = {split: [_reader(_read_chunks, p) for p in fs] for split, fs in files.items()}
  return Source("default", fp, shards, max_docs=max_docs)


def _c4_dir(path: Path) -> Path | None:
  for d in (path, path / "en"):
    if any(d.glob("c4-train.*.json.gz")) or any(d.glob("c4-validation.*.json.gz")):
      return d
  return None


def _c4_source(path, max_docs):
  if not path.is_dir():
    raise ValueError(f"data source 'c4:{path}': not a directory")
  d = _c4_dir(path)
  if d is None:
    raise ValueError(f"data source 'c4:{path}': no c4-train.*.json.gz or "
                     f"c4-validation.*.json.gz shards in {path} or {path / 'en'}")
  files = {s: sorted(d.glob(f"c4-{s}.*.json.gz")) for s in SPLITS}
  fp = "c4|" + _listing_fingerprint(d, files["train"] + files["validation"])
  shards = {s: [_reader(_read_json, p, strict=False) for p in fs] for s, fs in files.items()}
  return Source(f"c4:{path}", fp, shards, max_docs=max_docs)


def _local_source(path: Path, max_docs):
  if path.is_dir():
    root = path
    files = sorted((p for p in path.rglob("*") if p.name.endswith(_LOCAL_SUFFIXES)
                    and not p.is_dir() and not any(
                        part.startswith(".") for part in p.relative_to(path).parts)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
      raise ValueError(f"data source {str(path)!r}: no {'/'.join(_LOCAL_SUFFIXES)} files "
                       f"in {path}")
  elif path.name.endswith(_LOCAL_SUFFIXES):
    root, files = path.parent, [path]
  else:
    raise ValueError(f"data source {str(path)!r}: not a {'/'.join(_LOCAL_SUFFIXES)} file")

  def reader(p):
    return _reader(_read_txt if p.name.endswith(".txt") else _read_json, p)

  valid = [p for p in files if path.is_dir() and _VALID_RE.search(p.relative_to(root).as_posix())]
  if valid:
    valid_set = set(valid)
    shards = {"train": [reader(p) for p in files if p not in valid_set],
              "validation": [reader(p) for p in valid]}
  else:
    shards = {s: [_hash_split(reader(p), s) for p in files] for s in SPLITS}
  fp = "local|" + _listing_fingerprint(root, files)
  return Source(str(path), fp, shards, max_docs=max_docs)


def _hf_source(spec, max_docs, splits):
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"data source {spec!r} needs the `datasets` package "
                      "(pip install datasets, or the `llama` extra)") from e
  name, _, config = spec[3:].partition(":")
  if not name:
    raise ValueError(f"data source {spec!r}: expected hf:<name>[:<config>]")
  kw = {"data_files": config} if name in _HF_PACKAGED else {"name": config or None}
  if name in _HF_PACKAGED and not config:
    raise ValueError(f"data source {spec!r}: expected hf:{name}:<data files>")

  def load(split):
    return datasets.load_dataset(name, split=split, streaming=True, **kw)

  def reader(ds):
    def read(src, start):
      for i, ex in enumerate(ds.skip(start) if start else ds, start):
        if "text" not in ex:
          raise ValueError(f"data source {spec!r}: examples have no 'text' field "
                           f"(fields: {sorted(ex)})")
        if isinstance(ex["text"], str) and ex["text"].strip():
          yield i, ex["text"]
    return read

  train = load(splits["train"])
  try:
    valid = load(splits["validation"])
  except ValueError:  # no such split: hold out a hash split of train
    valid = None
  def readers(ds):  # one per data file where datasets can shard: resuming reads one file
    n = getattr(ds, "n_shards", 1)
    if n > 1 and hasattr(ds, "shard"):
      return [reader(ds.shard(num_shards=n, index=i, contiguous=True)) for i in range(n)]
    return [reader(ds)]

  if valid is None:
    shards = {s: [_hash_split(r, s) for r in readers(train)] for s in SPLITS}
  else:
    shards = {"train": readers(train), "validation": readers(valid)}
  return Source(spec, f"hf|{spec}|{sorted(splits.items())}", shards, max_docs=max_docs)


# --------------------------------------------------------------------------- tokenizers


@dataclasses.dataclass(eq=False)
class Tokenizer:
  """Text <-> ids.  ``encode_batch`` appends ``eos_id`` to every document; ``decode``
  drops special tokens.  Backed by UTF-8 bytes (``hf`` None) or a ``tokenizers.Tokenizer``.
  """

  name: str
  vocab_size: int
  pad_id: int
  eos_id: int
  bos_id: int | None = None
  hf: object = dataclasses.field(default=None, repr=False)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    if self.hf is None:
      return [list(t.encode("utf-8")) + [self.eos_id] for t in texts]
    encodings = self.hf.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids + [self.eos_id] for e in encodings]

  def decode(self, ids) -> str:
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
  """A snapshot of t5-base in the local HF cache holding its tokenizer, or None."""
  cache = _hub_cache()
  for repo in T5_REPOS:
    model = cache / f"models--{repo.replace('/', '--')}"
    ref = model / "refs" / "main"
    snaps = [model / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    snaps += sorted((model / "snapshots").glob("*"))
    for snap in snaps:
      if any((snap / f).is_file() for f in ("tokenizer.json", "spiece.model")):
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
  if vocab_size < 259:
    raise ValueError(f"a byte-level BPE needs vocab_size >= 259 (256 bytes + 3 specials), "
                     f"got {vocab_size}")
  cache = Path(cache_dir or "~/.cache/galore_jax/tokenizers").expanduser()
  key = _digest(f"bpe-v1|{source.fingerprint}|{vocab_size}|{BPE_TRAIN_CHARS}")[:16]
  path = cache / f"bpe-{_slug(source.name)}-{vocab_size}-{key}.json"
  name = f"bpe-{vocab_size}({source.name})"
  if path.is_file():
    try:
      return _wrap_hf(HFTokenizer.from_file(str(path)), name)
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"retraining the BPE: cannot load the cached {path}: {e}", stacklevel=2)
  tok = _train_bpe(_capped(source.documents("train"), BPE_TRAIN_CHARS), vocab_size)
  cache.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tok.save(str(tmp))
  os.replace(tmp, path)
  return _wrap_hf(tok, name)


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
    if _find_t5() is not None:
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


# --------------------------------------------------------------------------- batches


def _permutation(seed: int, epoch: int, n: int, m: int) -> list[int]:
  """A permutation of range(m) from a stable hash: the same on every machine/version."""
  return sorted(range(m), key=lambda i: hashlib.blake2b(
      f"{seed}/{epoch}/{n}/{i}".encode(), digest_size=8).digest())


def _encode(tok: Tokenizer, texts: list[str], seq_len: int | None) -> list[list[int]]:
  """``tok.encode_batch(texts)``; with ``seq_len`` (documents to be truncated) only a
  prefix of a long text is tokenized, unless it gives too few tokens."""
  if seq_len is None:
    return tok.encode_batch(texts)
  limit = 32 * seq_len
  out = tok.encode_batch([t[:limit] for t in texts])
  for i, t in enumerate(texts):
    if len(t) > limit and len(out[i]) < seq_len + 16:  # tokens > 32 chars: the whole text
      out[i] = tok.encode_batch([t])[0]
  return out


def _fit(ids: list[int], seq_len: int, tok: Tokenizer) -> list[int]:
  """Truncate to ``seq_len`` keeping the final eos, as the reference's HF tokenizer call
  (``truncation=True, max_length=256``) does."""
  return ids if len(ids) <= seq_len else ids[:seq_len - 1] + [tok.eos_id]


class Batches:
  """Shuffled training batches, deterministic in ``seed`` and resumable.

  Each batch is an int32 array (batch_size, seq_len).  With ``pack=False`` (the papers)
  row i is one document: truncated to ``seq_len`` (keeping its final eos) or
  right-padded with ``pad_id``; train on tokens[:, :-1] -> tokens[:, 1:] and mask
  targets == pad_id.  With ``pack=True`` documents are concatenated (each ending in
  eos) and cut into full rows; there is no padding.

  Documents are read in the source's order in windows of ``shuffle_window``; each
  window is permuted by a hash of (seed, epoch, window start).  After the split ends
  the next epoch starts with new permutations.  ``state()`` is the position:
  epoch, the window's start ``cursor`` (shard, item) and document count ``n``,
  ``offset`` of the next document in the window and, with packing, the tokens of that
  document already used (``skip``).  ``restore`` reads at most one shard prefix and
  one window again; it does not replay the past.
  """

  def __init__(self, source: Source, tokenizer: Tokenizer, *, seq_len: int = 256,
               batch_size: int, seed: int = 0, pack: bool = False, split: str = "train",
               shuffle_window: int = SHUFFLE_WINDOW):
    if seq_len < 2:
      raise ValueError(f"seq_len must be >= 2 (inputs and targets are shifted), got {seq_len}")
    if batch_size < 1 or shuffle_window < 1:
      raise ValueError(f"batch_size and shuffle_window must be >= 1, got {batch_size}, "
                       f"{shuffle_window}")
    _check_split(split)
    self.source, self.tokenizer, self.split = source, tokenizer, split
    self.seq_len, self.batch_size, self.seed, self.pack = seq_len, batch_size, seed, pack
    self.shuffle_window = shuffle_window
    self._set({"epoch": 0, "cursor": [0, 0], "n": 0, "offset": 0, "skip": 0, "batches": 0})

  def _set(self, pos):
    self._pos = (pos["epoch"], tuple(pos["cursor"]), pos["n"], pos["offset"])
    self._skip, self._batches = pos["skip"], pos["batches"]
    self._cur = None  # packing: [position of the document, its ids, tokens used]
    self._docs = self._documents(*self._pos)

  def _documents(self, epoch, cursor, n, offset):
    """Tokenized documents in shuffled order from a position; yields (next position, ids)."""
    while True:
      stream = self.source._stream(self.split, cursor, n)  # pylint: disable=protected-access
      while window := list(itertools.islice(stream, self.shuffle_window)):
        order = _permutation(self.seed, epoch, n, len(window))
        for k in range(offset, len(window), ENCODE_CHUNK):
          texts = [window[i][1] for i in order[k:k + ENCODE_CHUNK]]
          encoded = _encode(self.tokenizer, texts, None if self.pack else self.seq_len)
          for j, ids in enumerate(encoded):
            yield (epoch, cursor, n, k + j + 1), ids
        cursor, n, offset = window[-1][0], n + len(window), 0
      epoch, cursor, n, offset = epoch + 1, (0, 0), 0, 0

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    T = self.seq_len
    tokens_BxT = np.full((self.batch_size, T), self.tokenizer.pad_id, np.int32)
    for row in tokens_BxT:
      if not self.pack:
        self._pos, ids = next(self._docs)
        ids = _fit(ids, T, self.tokenizer)
        row[:len(ids)] = ids
        continue
      filled = 0
      while filled < T:
        if self._cur is None:
          before = self._pos
          self._pos, ids = next(self._docs)
          self._cur, self._skip = [before, ids, self._skip], 0
        _, ids, used = self._cur
        take = ids[used:used + T - filled]
        row[filled:filled + len(take)] = take
        filled += len(take)
        self._cur[2] += len(take)
        if self._cur[2] == len(ids):
          self._cur = None
    self._batches += 1
    return tokens_BxT

  def state(self) -> dict:
    """The data position (JSON-serialisable); ``restore`` continues from it."""
    pos, skip = (self._cur[0], self._cur[2]) if self._cur else (self._pos, self._skip)
    epoch, cursor, n, offset = pos
    return {"epoch": epoch, "cursor": list(cursor), "n": n, "offset": offset, "skip": skip,
            "batches": self._batches, "seed": self.seed, "pack": self.pack,
            "split": self.split, "shuffle_window": self.shuffle_window,
            "source": self.source.name, "tokenizer": self.tokenizer.name}

  def restore(self, state: Mapping) -> None:
    """Continue exactly where ``state`` (from ``state()`` of equal Batches) was taken."""
    mine = self.state()
    for k in ("seed", "pack", "split", "shuffle_window"):  # they change what a position means
      if k in state and state[k] != mine[k]:
        raise ValueError(f"cannot restore a data state taken with {k}={state[k]!r} into "
                         f"Batches with {k}={mine[k]!r}")
    for k in ("source", "tokenizer"):  # may be the same data under another path
      if k in state and state[k] != mine[k]:
        warnings.warn(f"restoring a data state taken with {k} {state[k]!r} into Batches "
                      f"with {k} {mine[k]!r}", stacklevel=2)
    self._set({"skip": 0, "batches": 0, **state})


def eval_batches(source: Source, tokenizer: Tokenizer, *, seq_len: int = 256, batch_size: int,
                 eval_tokens: int) -> list[np.ndarray]:
  """Validation batches (int32, (batch_size, seq_len)): the validation split in order,
  truncated / padded as in ``Batches``, up to and including the document that brings the
  non-pad target tokens (tokens[:, 1:]) to ``eval_tokens``; the last batch is filled
  with all-pad rows (masked out of the loss).  So the evaluated documents do not depend on
  ``batch_size``.  If the split ends first, a warning is given.  The same list on every
  call."""
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  out, rows, counted = [], [], 0

  def flush():
    out.append(np.asarray(rows + [[tokenizer.pad_id] * seq_len] * (batch_size - len(rows)),
                          np.int32))
    rows.clear()

  docs = source.documents("validation")
  while chunk := list(itertools.islice(docs, ENCODE_CHUNK)):
    for ids in _encode(tokenizer, chunk, seq_len):
      ids = _fit(ids, seq_len, tokenizer)
      rows.append(ids + [tokenizer.pad_id] * (seq_len - len(ids)))
      counted += sum(1 for i in ids[1:] if i != tokenizer.pad_id)
      if counted >= eval_tokens:
        flush()
        return out
      if len(rows) == batch_size:
        flush()
  if rows:
    flush()
  warnings.warn(f"data source {source.name!r}: the validation split has only {counted} "
                f"target tokens, fewer than eval_tokens={eval_tokens}", stacklevel=2)
  return out
