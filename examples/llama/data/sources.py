"""Text corpora for the LLaMA example: where the documents come from, in a fixed order.

Sources (``resolve_source``; the CLI prints ``SOURCE_HELP``):
  default         the embedded corpus: the Python sources (``*.py``) and docs
                  (``*.txt``, ``*.rst``) of the running interpreter's standard
                  library, without ``site-packages`` and test directories.  Files
                  are taken in sorted relative-path order; ~5% of them (by a stable
                  hash of the path) are the validation split, less the documents that
                  are training documents too (the library repeats some text).
  debian-docs[:<dir>]
                  English text from Debian's package registry (the GNU Collaborative
                  International Dictionary of English and the Linux kernel's
                  documentation), prepared once into <dir> (default
                  ``DEBIAN_DOCS_DIR``) by ``python -m examples.llama.data.debian
                  --download`` (``debian.py``): ~5x the default corpus.
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
  <file or dir>   local ``.txt``, ``.jsonl``, ``.json`` (JSON lines or one JSON list)
                  files, also gzipped (``.txt.gz``, ``.jsonl.gz``, ``.json.gz``), UTF-8
                  with or without a byte order mark.  A ``.txt`` file holds one
                  document per blank-line-separated block; JSON holds objects with a
                  "text" field.  Files whose relative path has a word val / valid /
                  validation / eval are the validation split; without such files
                  ~5% of the documents (by a hash of the text) are.  Files with the
                  word test, datasets' / debian.py's metadata (dataset_dict.json,
                  dataset_info.json, state.json, manifest.json) and tokenizers saved
                  beside the data (bpe-<vocab>.json, tokenizer.json and its configs)
                  are left out with a warning.  The start of every file (its first
                  line; a JSON list whole) is checked when the source is made; a bad
                  line or block found later (not JSON, no "text", not UTF-8) is
                  skipped with a warning naming the file and line, and its file
                  counted in ``Source.skipped``, as for C4.

Every ``.txt`` block and every file of the default corpus is cut at line boundaries
into documents of at most ``MAX_DOC_CHARS`` characters, so that truncation to 256
tokens keeps most of the text; JSON documents are used whole, as in C4.
"""

from __future__ import annotations

import codecs
import functools
import glob
import gzip
import hashlib
import itertools
import json
import numbers
import os
import re
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

SPLITS = ("train", "validation")
VALID_FRACTION = 0.05  # of files (default corpus) or documents (hash split)
MAX_DOC_CHARS = 2000  # documents cut from text files are at most this long
DEBIAN_DOCS_DIR = "runs/data/debian-docs"  # where debian.py writes debian-docs by default

# Help string for argparse (which %-formats it: "%%" prints "%").
SOURCE_HELP = (
    "training text: 'default' (the Python standard library's sources and docs, embedded; "
    "~5%% of the files are validation), 'debian-docs[:DIR]' (English from Debian's dictionary "
    "and kernel documentation packages, ~5x default; prepared once by `python -m "
    "examples.llama.data.debian --download`, default DIR " + DEBIAN_DOCS_DIR + "), a C4 "
    "directory ('c4:DIR' or DIR holding "
    "c4-train.*.json.gz / c4-validation.*.json.gz), 'hf:NAME[:CONFIG]' (a Hugging Face "
    "dataset, streamed; 'hf:json:GLOB' for local JSON files), or a local .txt (one document "
    "per blank-line-separated block) / .jsonl / .json (JSON lines or one list) file, "
    "gzipped or not (.txt.gz, .jsonl.gz, .json.gz), or a directory of them (files whose "
    "path has the word val, valid, validation or eval, e.g. c4-validation.0.json.gz or "
    "eval/part1.jsonl, are the validation split: not 'evaluation' or 'dev'; without such "
    "files ~5%% of the documents by hash; files with the word test and metadata such as "
    "dataset_info.json or manifest.json are left out, with a warning)")

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_DEFAULT_SUFFIXES = (".py", ".txt", ".rst")
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".txt.gz", ".json.gz", ".jsonl.gz")
_TXT_SUFFIXES = (".txt", ".txt.gz")
_VALID_RE = re.compile(r"(?<![a-z])(val|valid|validation|eval)(?![a-z])", re.IGNORECASE)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads keeps them; UTF-8 cannot
# surrogateescape's stand-ins for bytes that are not UTF-8: they spoil their line or block,
# which is skipped, not the rest of the file
_BAD_BYTE = re.compile("[\udc80-\udcff]")
_TEST_RE = re.compile(r"(?<![a-z])test(?![a-z])", re.IGNORECASE)  # a held-out test split
# What datasets' save_to_disk, debian.py and the like write beside the data: no documents
_METADATA = {"dataset_dict.json", "dataset_info.json", "dataset_infos.json", "state.json",
             "manifest.json"}
# A tokenizer saved beside the data (debian.py's bpe-<vocab>.json, a Hugging Face one)
_TOKENIZER_RE = re.compile(
    r"(bpe-\d+|tokenizer|tokenizer_config|special_tokens_map|added_tokens)\.json")
_HF_PACKAGED = ("json", "text", "csv", "parquet", "arrow")

# A shard reader: (source, start item) -> (item, text) for every item >= start.
Reader = Callable[["Source", int], Iterator[tuple[int, str]]]


def digest(s: str) -> str:
  """A stable hex hash of ``s`` (source fingerprints, the BPE cache key); a file name's bytes
  that are not UTF-8 (Python's surrogate escapes of them) hash as those bytes."""
  return hashlib.blake2b(s.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def _unit(key: str) -> float:
  """A stable hash of ``key`` in [0, 1): the same on every machine and run."""
  h = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(h, "big") / 2.0**64


def check_count(value, name: str, low: int = 1) -> int:
  """``value`` if it is an int (not a bool) >= ``low``, else a one-line ``ValueError`` naming
  ``name``: a float or a string would be taken (1.5 documents, a seed of 'a') or fail later
  in a comparison."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  return int(value)


def check_split(split: str):
  """Raises ValueError unless ``split`` is one of ``SPLITS``."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class Source:
  """A text corpus with a train and a validation split.

  Attributes:
    name: what it is (in messages and in the BPE cache key).
    fingerprint: changes whenever the documents may (BPE cache key).
    listing: the files and their sizes (not their times: a copy keeps it): what a saved
      data position, a file and a line in it, points into (``max_docs`` does not move it:
      a position past a smaller cap starts the next epoch).
    listings: ``listing`` and the form saved before it left ``max_docs`` out.
    max_docs: cap on the documents of each split, or None.
    skipped: files whose corrupt parts (a line, a block, the rest of the file) were skipped
      so far, each warned about once, at its first corrupt part.
    skipped_parts: how many such parts, each counted once however often it is read.
    empty_hint: what ends the error of a split without documents (how the split is made).
  """

  def __init__(self, name: str, fingerprint: str, shards: Mapping[str, list[Reader]], *,
               max_docs: int | None = None, listing: str | None = None, empty_hint: str = ""):
    self.name, self.max_docs, self.empty_hint = name, max_docs, empty_hint
    self.fingerprint = digest(f"{fingerprint}|max_docs={max_docs}")
    listing = fingerprint if listing is None else listing
    self.listing = digest(listing)
    self._capped_listing = digest(f"{listing}|max_docs={max_docs}")  # the form saved before
    self._shards = dict(shards)
    self._bad: set[str] = set()
    self._bad_parts: set[tuple[str, int | None]] = set()

  def __repr__(self):
    return f"Source({self.name!r}, max_docs={self.max_docs})"

  @property
  def listings(self) -> tuple[str, str]:
    """``listing``, and the form saved before it left ``max_docs`` out."""
    return self.listing, self._capped_listing

  @property
  def skipped(self) -> int:
    """How many files had corrupt parts skipped so far."""
    return len(self._bad)

  @property
  def skipped_parts(self) -> int:
    """How many corrupt parts (lines, blocks, rests of files) were skipped so far."""
    return len(self._bad_parts)

  def documents(self, split: str) -> Iterator[str]:
    """The documents of ``split`` ("train" or "validation"), always in the same order."""
    for _, text in self.stream(split):
      yield text

  def stream(self, split: str, cursor=(0, 0),
             n: int = 0) -> Iterator[tuple[tuple[int, int], str]]:
    """Documents of ``split`` from ``cursor`` = (shard, item), ``n`` of them already taken
    (for ``max_docs``); yields (cursor of the next document, text).  ``Batches`` resumes
    from such a cursor: it reads at most one shard prefix again."""
    check_split(split)
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
      raise ValueError(f"data source {self.name!r} has no documents in its {split!r} split"
                       + self.empty_hint)

  def _corrupt(self, path, why, part: int | None = None):
    """Skip a corrupt shard, or its line or block ``part``, warning once per file; ``why``
    may be a function that says it (called only for the warning)."""
    self._bad_parts.add((str(path), part))
    if str(path) not in self._bad:
      self._bad.add(str(path))
      why = why() if callable(why) else why
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
  if max_docs is not None:
    max_docs = check_count(max_docs, "max_docs")
  if spec == "default":
    src = _default_source(max_docs)
  elif spec == "debian-docs" or spec.startswith("debian-docs:"):
    src = _debian_docs_source(spec, max_docs)
  elif spec.startswith("hf:"):
    return _hf_source(spec, max_docs, {"train": "train", "validation": "validation",
                                       **(splits or {})})
  else:
    if spec in ("", "c4:"):  # (Path("") is the working directory)
      raise ValueError(f"data source {spec!r}: expected a path, c4:<dir>, hf:<name> or default")
    path = Path(spec[3:] if spec.startswith("c4:") else spec).expanduser()
    if not path.exists():
      hint = "" if "/" not in spec or spec.startswith(("/", ".", "~", "c4:")) else (
          f" (for a Hugging Face dataset use 'hf:{spec}')")
      if any(c in spec for c in "*?["):
        hint = f" (files by a pattern: 'hf:json:{spec}', or their directory)"
      raise FileNotFoundError(f"data source {spec!r}: no such file or directory: {path}{hint}")
    if spec.startswith("c4:") or (path.is_dir() and _c4_dir(path)):
      src = _c4_source(path, max_docs)
    else:
      src = _local_source(path, max_docs)
  for split in SPLITS:  # fail now, not mid-run, on an empty split
    next(src.stream(split), None)
  return src


def chunks(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
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
    yield from chunks(block.strip("\n"))


def _first_bad_byte(path: Path) -> int | None:
  """The file offset (of the decompressed text, for .gz) of its first byte that is not
  UTF-8: a text reader's error counts from the start of its read chunk."""
  decoder, pos = codecs.getincrementaldecoder("utf-8")(), 0
  try:
    with _open_bytes(path) as f:
      while chunk := f.read(1 << 20):
        pending = len(decoder.getstate()[0])  # an unfinished sequence from the last chunk
        try:
          decoder.decode(chunk)
        except UnicodeDecodeError as e:
          return pos - pending + e.start
        pos += len(chunk)
  except (OSError, EOFError, zlib.error):
    pass
  return None


def _file_error(path, e: BaseException) -> Exception:
  if isinstance(e, UnicodeDecodeError):
    return ValueError(f"{path}: {_not_utf8(path, e.reason)}")
  if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile):
    return OSError(f"cannot read {path}: {e.strerror or e}")
  return ValueError(f"{path}: corrupt file ({type(e).__name__}: {e})")


def _not_utf8(path, reason: str = "invalid bytes") -> str:
  at = _first_bad_byte(Path(path))
  return f"not UTF-8 text ({reason}{'' if at is None else f' at byte {at}'})"


def _open_bytes(path: Path):
  return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _open_text(path: Path, encoding="utf-8-sig"):
  # surrogateescape: a byte that is not UTF-8 spoils only its line or block (_BAD_BYTE);
  # utf-8-sig: a byte order mark is read past
  if path.name.endswith(".gz"):
    return gzip.open(path, "rt", encoding=encoding, errors="surrogateescape")
  return open(path, encoding=encoding, errors="surrogateescape")


def _is_json_list(path: Path, first_line: str) -> bool:
  """A ``.json(.gz)`` file whose first non-blank line opens a list: one JSON list of
  documents (else JSON lines under a .json name)."""
  return path.name.endswith((".json", ".json.gz")) and first_line.lstrip().startswith("[")


def _check_start(path: Path) -> bool:
  """Raises (one line naming ``path``) unless ``path`` opens, its first non-blank line is
  UTF-8 and, in a JSON file, a document with a "text" field (a JSON list is read whole, as
  it will be): what can be checked when a source is made, not mid-run, for the price of a
  line.  Later bad lines are skipped with a warning when they are read.  Returns whether
  the file starts with a byte order mark."""
  try:
    with _open_bytes(path) as f:
      n, raw = 1, f.readline()
      bom, raw = raw.startswith(codecs.BOM_UTF8), raw.removeprefix(codecs.BOM_UTF8)
      while raw and not raw.strip():
        n, raw = n + 1, f.readline()
      line = raw.decode("utf-8")
      if path.name.endswith(_TXT_SUFFIXES) or not line.strip():
        return bom
      if _is_json_list(path, line):
        _json_list(path, line + f.read().decode("utf-8"))
        return bom
      try:
        _json_text(json.loads(line))
      except ValueError as e:
        raise ValueError(f"{path}:{n}: {e}") from None
      return bom
  except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
    raise _file_error(path, e) from e


def _read_chunks(src: Source, start: int, path: Path) -> Iterator[tuple[int, str]]:
  """A default-corpus file: ``_chunks`` of it; an unreadable file is skipped."""
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    src._corrupt(path, e)
    return
  yield from itertools.islice(enumerate(chunks(text)), start, None)


def _readable(path: Path) -> tuple[str, BaseException | None]:
  """The text of ``path`` (UTF-8; a byte that is not spoils only its line, _BAD_BYTE) up to
  where it cannot be read further, and why (``None``: read whole): of a truncated .gz, the
  complete lines before the cut."""
  parts, error = [], None
  try:
    with _open_bytes(path) as f:
      while chunk := f.read1(1 << 16):  # (read() would drop what it had at the cut)
        parts.append(chunk)
  except (OSError, EOFError, zlib.error) as e:
    error = e
  text = b"".join(parts).decode("utf-8", errors="surrogateescape")
  return (text, None) if error is None else (text[:text.rfind("\n") + 1], error)


def _read_txt(src: Source, start: int, path: Path) -> Iterator[tuple[int, str]]:
  """A local .txt(.gz) file: one document per blank-line-separated block; a piece of one
  with bytes that are not UTF-8 is skipped (its line named in the warning), and so is the
  rest of a truncated file (its last block, which the cut may have shortened, too)."""
  text, error = _readable(path)  # (its BOM: below)
  if error is not None:
    src._corrupt(path, f"{type(error).__name__}: {error}")
    text = text[:text.rfind("\n\n") + 1]

  def why():  # the line of the file's first byte that is not UTF-8
    line = text.count("\n", 0, _BAD_BYTE.search(text).start()) + 1
    return f"line {line}: {_not_utf8(path)}"

  for i, doc in itertools.islice(enumerate(_blocks(text)), start, None):
    if i == 0:  # a byte order mark is no text: dropped here, so that items keep their number
      doc = doc.removeprefix("\ufeff").lstrip("\n")
    if _BAD_BYTE.search(doc):
      src._corrupt(path, why, i)
    elif doc.strip():
      yield i, doc


def _json_text(obj):
  text = obj.get("text") if isinstance(obj, dict) else obj
  if not isinstance(text, str):
    raise ValueError('not a JSON object with a string "text" field')
  if _LONE_SURROGATE.search(text):  # a \ud800 escape: no UTF-8 text, so no tokens
    raise ValueError('"text" holds a lone surrogate escape (such as \\ud800): not text')
  return text


def _json_list(path: Path, text: str) -> list[str]:
  """The texts of a JSON list file (raises naming ``path`` when it is not one)."""
  try:
    items = json.loads(text)
  except ValueError as e:  # (json.JSONDecodeError names no file)
    raise ValueError(f"{path}: not a JSON list of documents: {e}") from None
  if not isinstance(items, list):
    raise ValueError(f"{path}: expected a JSON list of documents")
  texts = []
  for i, obj in enumerate(items):
    try:
      texts.append(_json_text(obj))
    except ValueError as e:
      raise ValueError(f"{path}: item {i}: {e}") from None
  return texts


def _read_json(src: Source, start: int, path: Path):
  """JSON lines (or, for ``.json``, one JSON list) of objects with a "text" field.  A bad
  line (not JSON, no "text", not UTF-8), or the rest of a truncated file, is skipped with a
  warning (``Source.skipped``)."""
  try:
    with _open_text(path) as f:
      try:
        head = f.read(4096)
      except EOFError:  # a truncated .gz of fewer characters: its complete lines
        yield from _json_lines(src, start, path, _readable(path)[0].splitlines(keepends=True))
        raise
      if _is_json_list(path, head):
        try:  # (checked whole by _check_start: bad here only if it changed since)
          texts = _json_list(path, head + f.read())
        except ValueError as e:
          src._corrupt(path, str(e).removeprefix(f"{path}: "))
          return
        yield from ((i, t) for i, t in itertools.islice(enumerate(texts), start, None)
                    if t.strip())
        return
      f.seek(0)
      yield from _json_lines(src, start, path, f)
  except (OSError, EOFError, zlib.error) as e:
    src._corrupt(path, f"{type(e).__name__}: {e}")


def _json_lines(src: Source, start: int, path: Path, lines) -> Iterator[tuple[int, str]]:
  """The texts of JSON ``lines`` from line ``start`` on; a bad line is skipped (warned)."""
  for i, line in enumerate(lines):
    if i < start or not line.strip():
      continue
    if i == 0:
      line = line.removeprefix("\ufeff")
    if _BAD_BYTE.search(line):
      src._corrupt(path, lambda: f"line {i + 1}: {_not_utf8(path)}", i)
      continue
    try:
      text = _json_text(json.loads(line))
    except ValueError as e:
      src._corrupt(path, f"line {i + 1}: {e}", i)
      continue
    if text.strip():
      yield i, text


def _hash_split(reader: Reader, split: str) -> Reader:
  """Keep the documents of ``reader`` that a stable hash of their text puts in ``split``."""
  want = split == "validation"

  def read(src, start):
    for item, text in reader(src, start):
      if (_unit(text) < VALID_FRACTION) == want:
        yield item, text

  return read


def _file_ids(prefix: str, root: Path, files) -> dict[str, str]:
  """A file source's ``fingerprint`` (``prefix``, then the files' names, sizes and times:
  the BPE cache key) and ``listing`` (names and sizes only: a copy elsewhere is the same
  data), each file stat'ed once."""
  rows = [(p.relative_to(root).as_posix(), _stat(p)) for p in files]
  return {"fingerprint": prefix + digest("\n".join(f"{n}:{s}" for n, s in rows)),
          "listing": digest("\n".join(f"{n}:{s.partition(':')[0]}" for n, s in rows))}


def _stat(p: Path) -> str:
  try:
    st = p.stat()
  except OSError:
    return "?"
  return f"{st.st_size}:{int(st.st_mtime)}"


def _reader(fn, path, **kw) -> Reader:
  return lambda src, start: fn(src, start, path, **kw)


def _unseen(readers: list[Reader], train: list[Reader]) -> list[Reader]:
  """``readers`` without the documents that are, verbatim, training documents too.  The
  standard library repeats some text in files of both splits (codec tables, a sample
  script: 12 of Python 3.11's 243 validation documents, 5% of its characters), and a
  held-out score must not reward remembering it.  The training digests are taken once per
  source, on first read (a pass over the training files: a fraction of a second)."""
  @functools.cache
  def seen(src) -> frozenset[str]:
    return frozenset(digest(text) for read in train for _, text in read(src, 0))

  def unseen(read: Reader) -> Reader:
    return lambda src, start: ((i, t) for i, t in read(src, start) if digest(t) not in seen(src))
  return [unseen(read) for read in readers]


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
  shards = {split: [_reader(_read_chunks, p) for p in fs] for split, fs in files.items()}
  shards["validation"] = _unseen(shards["validation"], shards["train"])
  ids = _file_ids(f"default|{sys.version_info[:3]}|", root, sum(files.values(), []))
  return Source("default", shards=shards, max_docs=max_docs, **ids)


def _debian_docs_source(spec, max_docs):
  """The corpus ``debian.py`` prepared: train-NNN.jsonl.gz and validation.jsonl.gz."""
  path = Path(spec.partition(":")[2] or DEBIAN_DOCS_DIR).expanduser()
  files = {"train": sorted(path.glob("train-*.jsonl.gz")),
           "validation": sorted(path.glob("validation.jsonl.gz"))}
  if not all(files.values()):
    raise FileNotFoundError(
        f"data source {spec!r}: no prepared corpus in {path} (train-*.jsonl.gz, "
        f"validation.jsonl.gz); build it once where Debian's package registry is reachable: "
        f"python -m examples.llama.data.debian --download --out {path}")
  shards = {s: [_reader(_read_json, p) for p in fs] for s, fs in files.items()}
  ids = _file_ids("debian-docs|", path, files["train"] + files["validation"])
  return Source(spec, shards=shards, max_docs=max_docs, **ids)


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
  shards = {s: [_reader(_read_json, p) for p in fs] for s, fs in files.items()}
  ids = _file_ids("c4|", d, files["train"] + files["validation"])
  return Source(f"c4:{path}", shards=shards, max_docs=max_docs, **ids)


def _leave_out(path: Path, files: list[Path], kind: str, why: str):
  if files:
    warnings.warn(f"data source {str(path)!r}: leaving out {len(files)} {kind} file(s)"
                  f" ({', '.join(p.relative_to(path).as_posix() for p in files[:3])}"
                  f"{', ...' if len(files) > 3 else ''}): {why}", stacklevel=3)


def _local_source(path: Path, max_docs):
  if path.is_dir():
    root = path
    files = sorted((p for p in path.rglob("*") if p.name.endswith(_LOCAL_SUFFIXES)
                    and not p.is_dir() and not any(
                        part.startswith(".") for part in p.relative_to(path).parts)),
                   key=lambda p: p.relative_to(path).as_posix())
    meta = [p for p in files if p.name in _METADATA]
    _leave_out(path, meta, "metadata", "datasets / manifest metadata, not documents")
    tokenizers = [p for p in files if _TOKENIZER_RE.fullmatch(p.name)]
    _leave_out(path, tokenizers, "tokenizer", "a tokenizer, not documents")
    no_documents = set(meta + tokenizers)
    tests = [p for p in files if p not in no_documents and _TEST_RE.search(
        p.relative_to(path).as_posix())]
    # a test split is for the end, not for training nor for choosing
    _leave_out(path, tests, "test", "neither trained on nor used for validation")
    left_out = no_documents.union(tests)
    files = [p for p in files if p not in left_out]
    if not files:
      besides = " and ".join(k for k, fs in (("metadata", meta), ("tokenizer", tokenizers),
                                             ("test", tests)) if fs)
      raise ValueError(f"data source {str(path)!r}: no {'/'.join(_LOCAL_SUFFIXES)} files "
                       f"in {path}" + (f" besides {besides} files" if besides else ""))
  elif path.name.endswith(_LOCAL_SUFFIXES):
    root, files = path.parent, [path]
  else:
    raise ValueError(f"data source {str(path)!r}: not a {'/'.join(_LOCAL_SUFFIXES)} file")

  # Fail now, not mid-run, where a file's first line can tell.  A byte order mark was the
  # start of a .txt file's first document (and refused in JSON): not the documents a BPE
  # cached before was trained on.
  boms = [p for p in files if _check_start(p)]

  def reader(p):
    return _reader(_read_txt if p.name.endswith(_TXT_SUFFIXES) else _read_json, p)

  valid = [p for p in files if path.is_dir() and _VALID_RE.search(p.relative_to(root).as_posix())]
  if valid:
    valid_set = set(valid)
    shards = {"train": [reader(p) for p in files if p not in valid_set],
              "validation": [reader(p) for p in valid]}
    hint = ""
  else:
    shards = {s: [_hash_split(reader(p), s) for p in files] for s in SPLITS}
    hint = (f" (with no file named val / valid / validation / eval, {VALID_FRACTION:.0%} of the"
            " documents, by a hash of each text, are the validation split: give more documents,"
            " or a directory with such a file)")
  prefix = "local|bom|" if boms else "local|"
  return Source(str(path), shards=shards, max_docs=max_docs, empty_hint=hint,
                **_file_ids(prefix, root, files))


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
    try:
      return datasets.load_dataset(name, split=split, streaming=True, **kw)
    except StopIteration:  # datasets' packaged builders, given no rows to infer features from
      raise ValueError(f"data source {spec!r}: no examples to read (empty files, or a"
                       " pattern that matches none)") from None

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
  return Source(spec, shards=shards, max_docs=max_docs, **_hf_ids(spec, name, config, splits))


def _hf_ids(spec, name, config, splits) -> dict[str, str]:
  """An ``hf:`` source's fingerprint and listing: its spec, and for a packaged builder
  reading local files (``hf:json:/data/*.jsonl``) those files as a file source's are, so that
  a changed file retrains a cached BPE and refuses a resume (its position moved)."""
  base = f"hf|{spec}|{sorted(splits.items())}"
  files = []
  if name in _HF_PACKAGED:
    pattern = os.path.expanduser(config)
    files = sorted(p for p in map(Path, glob.glob(pattern, recursive=True)) if p.is_file())
  if not files:
    return {"fingerprint": base}
  return _file_ids(base, Path(os.path.commonpath([p.parent for p in files])), files)
