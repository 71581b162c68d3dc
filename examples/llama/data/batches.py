"""Training and validation batches for the LLaMA example: shuffled, truncated or packed.

Batches: ``Batches`` shuffles the train documents with a seeded, hash-based
permutation of consecutive windows of ``shuffle_window`` documents (a corpus smaller
than the window is fully permuted, differently every epoch) and is resumable from a
small JSON ``state()``.  ``eval_batches`` reads the validation split in order.
``Prefetch`` makes the next batches in a background thread while the device trains.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
import warnings
from collections.abc import Mapping

import numpy as np

from examples.llama.data.sources import Source, check_count, check_split
from examples.llama.data.tokenizers import Tokenizer

SHUFFLE_WINDOW = 8192  # documents permuted together
ENCODE_CHUNK = 256  # documents tokenized per encode_batch call


def _permutation(seed: int, epoch: int, n: int, m: int) -> list[int]:
  """A permutation of range(m) from a stable hash: the same on every machine/version."""
  return sorted(range(m), key=lambda i: hashlib.blake2b(
      f"{seed}/{epoch}/{n}/{i}".encode(), digest_size=8).digest())


SPACES = " \t\r\n"


def word_prefix(text: str, limit: int) -> str:
  """``text`` cut where its last word to end by ``limit`` ends (before the whitespace that
  follows it: a tokenizer that splits words at whitespace gives the prefix's words the tokens
  they have in the whole text); all of ``text`` when no longer than ``limit``, "" when no
  word ends by then.

  >>> word_prefix("one two  three", 9), word_prefix("one two", 9), word_prefix("three", 2)
  ('one two', 'one two', '')
  """
  if len(text) <= limit:
    return text
  end = max(text.rfind(c, 0, limit + 1) for c in SPACES)
  return text[:max(end, 0)].rstrip(SPACES)


def _encode(tok: Tokenizer, texts: list[str], seq_len: int | None) -> list[list[int]]:
  """``tok.encode_batch(texts)``; with ``seq_len`` (documents to be truncated) only a
  prefix of a long text is tokenized, cut after a word (a cut inside one could change its
  first tokens: a Unigram's best split of a long run of '=' depends on where it ends) and
  doubled until it gives enough tokens, up to the whole text."""
  if seq_len is None:
    return tok.encode_batch(texts)
  limit = 32 * seq_len
  out = tok.encode_batch([word_prefix(t, limit) for t in texts])
  for i, t in enumerate(texts):
    grown = limit
    # (16 to spare: a tokenizer may still split the last word by what follows it)
    while len(t) > grown and len(out[i]) < seq_len + 16:
      grown *= 2
      out[i] = tok.encode_batch([word_prefix(t, grown)])[0]
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
    seq_len = check_count(seq_len, "seq_len", 2)  # (inputs and targets are shifted)
    batch_size = check_count(batch_size, "batch_size")
    shuffle_window = check_count(shuffle_window, "shuffle_window")
    seed = check_count(seed, "seed", 0)
    check_split(split)
    self.source, self.tokenizer, self.split = source, tokenizer, split
    self.seq_len, self.batch_size, self.seed, self.pack = seq_len, batch_size, seed, pack
    self.shuffle_window = shuffle_window
    self._tokenizer_id = tokenizer.identity()  # (a BPE's whole definition: digested once)
    self._set({"epoch": 0, "cursor": [0, 0], "n": 0, "offset": 0, "skip": 0, "batches": 0})

  def _set(self, pos):
    self._pos = (pos["epoch"], tuple(pos["cursor"]), pos["n"], pos["offset"])
    self._skip, self._batches = pos["skip"], pos["batches"]
    self._cur = None  # packing: [position of the document, its ids, tokens used]
    self._docs = self._documents(*self._pos)

  def _documents(self, epoch, cursor, n, offset):
    """Tokenized documents in shuffled order from a position; yields (next position, ids)."""
    while True:
      stream = self.source.stream(self.split, cursor, n)
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
            "source": self.source.name, "tokenizer": self.tokenizer.name,
            "tokenizer_id": self._tokenizer_id, "listing": self.source.listing}

  def same_tokenizer(self, state: Mapping) -> bool:
    """Whether ``state`` (from ``state()``) records this tokenizer, by its ids' meaning
    (``Tokenizer.identity``), whatever it was called (a state that predates that: False)."""
    return state.get("tokenizer_id") == self._tokenizer_id

  def refusal(self, state: Mapping) -> str | None:
    """Why ``state`` cannot continue here, in words, or ``None``: its tokenizer is another
    (its ids mean other text), or its source's files are others (its position, a file and a
    line, points into other documents).  (A state saved before these were recorded: None.)"""
    if "tokenizer_id" in state and not self.same_tokenizer(state):
      return (f"the tokenizer ({self.tokenizer.name}) is not the one the run was trained with"
              f" ({state.get('tokenizer')}): its token ids mean other text")
    if state.get("listing", self.source.listing) not in self.source.listings:
      return (f"the files of data source {self.source.name!r} differ from the run's (added,"
              " removed, renamed or resized): its data position points into other documents")
    return None

  def restore(self, state: Mapping) -> None:
    """Continue exactly where ``state`` (from ``state()`` of equal Batches) was taken;
    ``ValueError`` where it cannot (:meth:`refusal`, or another seed, packing, split)."""
    why = self.refusal(state)
    if why is not None:
      raise ValueError(f"cannot restore this data state: {why}")
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
  call.  A split with no target token at all is refused (``ValueError``)."""
  seq_len = check_count(seq_len, "seq_len", 2)
  batch_size = check_count(batch_size, "batch_size")
  eval_tokens = check_count(eval_tokens, "eval_tokens")
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
  if not counted:  # every target a pad: an evaluation would say loss 0, perplexity 1
    raise ValueError(f"data source {source.name!r}: the validation split has no target token"
                     f" at seq_len={seq_len} (each row's tokens after the first are pad_id "
                     f"{tokenizer.pad_id}): a longer seq_len, or a tokenizer with a pad token")
  warnings.warn(f"data source {source.name!r}: the validation split has only {counted} "
                f"target tokens, fewer than eval_tokens={eval_tokens}", stacklevel=2)
  return out


class Prefetch:
  """Tokenizes the next batches in a background thread while the device trains.

  Yields ``(batch, data position after it)``: the position saved in a checkpoint
  is that of the last batch trained on, not of the last one prefetched.
  """

  def __init__(self, batches: Batches, depth: int = 4):
    self.batches, self.queue = batches, queue.Queue(depth)
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._produce, daemon=True)
    self.thread.start()

  def _produce(self):
    while not self.stop.is_set():
      try:
        item = (next(self.batches), self.batches.state())
      except BaseException as e:  # handed to the consumer, raised there
        item = e
      while not self.stop.is_set():
        try:
          self.queue.put(item, timeout=0.1)
          break
        except queue.Full:
          pass
      if isinstance(item, BaseException):
        return

  def __next__(self):
    item = self.queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    """Stops the producer thread and waits for it."""
    self.stop.set()
    self.thread.join()
