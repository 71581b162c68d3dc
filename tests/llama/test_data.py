"""The LLaMA example's data module: sources, tokenizers, batches, resume, bad input.

Everything runs offline on small fixtures made in ``tmp_path``.
"""

import dataclasses
import gzip
import importlib.util
import json
import os
import re
import sys
import warnings

import numpy as np
import pytest

from examples.llama import data as D
from examples.llama.data import batches, debian, sources, tokenizers


def docs_(n, prefix="doc"):
  """n distinct documents, each starting with a fixed-width id."""
  return [f"{prefix}{i:03d} " + " ".join(f"w{(i * 7 + j) % 31}" for j in range(i % 9 + 1))
          for i in range(n)]


def write_jsonl(path, texts, gz=False):
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = "".join(json.dumps({"text": t, "url": "x"}) + "\n" for t in texts)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(lines)
  else:
    path.write_text(lines, encoding="utf-8")
  return path


def write_txt(path, texts):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
  return path


def splits(src):
  return list(src.documents("train")), list(src.documents("validation"))


def corpus(tmp_path, n=30, name="corpus"):
  """A local source with n train and 6 validation documents."""
  d = tmp_path / name
  write_jsonl(d / "train.jsonl", docs_(n))
  write_jsonl(d / "valid.jsonl", docs_(6, prefix="val"))
  return D.resolve_source(str(d))


BYTES = D.load_tokenizer("bytes")


def doc_id(row, tok=BYTES):
  return tok.decode(row)[:6]


# --------------------------------------------------------------------------- sources


@pytest.fixture
def c4_dir(tmp_path):
  d = tmp_path / "c4" / "en"
  write_jsonl(d / "c4-train.00000-of-00003.json.gz", docs_(40), gz=True)
  # A bad JSON line in the middle: that line is skipped.
  good = docs_(10, prefix="bad")
  lines = [json.dumps({"text": t}) for t in good[:5]] + ["{not json"]
  lines += [json.dumps({"text": t}) for t in good[5:]]
  with gzip.open(d / "c4-train.00001-of-00003.json.gz", "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  # A truncated gzip stream: the rest of the shard is skipped.
  whole = write_jsonl(d / "c4-train.00002-of-00003.json.gz", docs_(300, prefix="cut"), gz=True)
  data = whole.read_bytes()
  whole.write_bytes(data[: len(data) // 2])
  write_jsonl(d / "c4-validation.00000-of-00001.json.gz", docs_(10, prefix="val"), gz=True)
  return tmp_path / "c4"


def test_c4_layout_and_corrupt_shards(c4_dir):
  src = D.resolve_source(str(c4_dir))
  assert src.name.startswith("c4:") and src.skipped == 0
  with pytest.warns(UserWarning) as record:
    train = list(src.documents("train"))
  messages = " ".join(str(w.message) for w in record)
  assert "c4-train.00001-of-00003.json.gz" in messages and "line 6" in messages
  assert "c4-train.00002-of-00003.json.gz" in messages
  assert src.skipped == 2
  assert train[:50] == docs_(40) + docs_(10, prefix="bad")
  assert 50 < len(train) < 340 and set(train[50:]) <= set(docs_(300, prefix="cut"))
  assert list(src.documents("validation")) == docs_(10, prefix="val")
  # Reading again warns no more and counts no more.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert list(src.documents("train")) == train
  assert src.skipped == 2
  # The explicit spec, the en/ subdirectory and max_docs.
  src2 = D.resolve_source(f"c4:{c4_dir / 'en'}", max_docs=7)
  assert splits(src2) == (docs_(7), docs_(7, prefix="val"))


@pytest.mark.parametrize("kind", ["txt", "small_jsonl"])
def test_a_truncated_gzip_keeps_what_can_be_read(tmp_path, kind):
  """"The rest of a truncated file is skipped": a .txt.gz cut in half gave no document at all,
  and so did a .jsonl.gz of under 4096 characters (its first read raised EOFError)."""
  d = tmp_path / "d"
  texts = docs_(400 if kind == "txt" else 60)
  if kind == "txt":
    d.mkdir()
    with gzip.open(d / "train.txt.gz", "wt", encoding="utf-8") as f:
      f.write("\n\n".join(texts) + "\n")
    path = d / "train.txt.gz"
  else:
    path = write_jsonl(d / "train.jsonl.gz", texts, gz=True)
  write_jsonl(d / "validation.jsonl", docs_(5, prefix="val"))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) * 3 // 4])
  with pytest.warns(UserWarning, match="skipping corrupt .*train"):
    train = list(D.resolve_source(str(d)).documents("train"))
  assert len(train) > len(texts) // 3 and train == texts[:len(train)]


def test_local_txt_file_blocks_and_hash_split(tmp_path):
  blocks = docs_(200)
  long_block = "\n".join(f"line {i} " + "y" * 40 for i in range(120))  # ~6000 chars
  path = write_txt(tmp_path / "book.txt", blocks[:100] + [long_block] + blocks[100:])
  train, valid = splits(D.resolve_source(str(path)))
  assert train and valid and not set(train) & set(valid)
  pieces = [d for d in train + valid if d.startswith("line")]
  assert all(len(d) <= sources.MAX_DOC_CHARS for d in train + valid)
  assert len(pieces) >= 3 and "".join(sorted(pieces, key=lambda d: int(d.split()[1]))).replace(
      "\n", "") == long_block.replace("\n", "")
  others = [d for d in train + valid if not d.startswith("line")]
  assert sorted(others) == sorted(blocks)
  assert 0 < len(valid) < 0.15 * len(train)
  assert [d for d in train if d in blocks] == [b for b in blocks if b in train]  # file order
  assert splits(D.resolve_source(str(path))) == (train, valid)  # deterministic


def test_local_dir_with_validation_files(tmp_path):
  d = tmp_path / "data"
  write_jsonl(d / "train.jsonl", docs_(5))
  write_txt(d / "more" / "b.txt", docs_(3, prefix="txt"))
  (d / "more" / "c.json").write_text(json.dumps([{"text": "list doc 1"}, "list doc 2"]))
  write_jsonl(d / "more" / "d.json.gz", ["gz doc"], gz=True)
  write_jsonl(d / "valid.jsonl", docs_(4, prefix="val"))
  write_txt(d / ".hidden.txt", ["hidden"])
  (d / "notes.md").write_text("not data")
  src = D.resolve_source(str(d), max_docs=100)
  train, valid = splits(src)
  assert train == docs_(3, prefix="txt") + ["list doc 1", "list doc 2", "gz doc"] + docs_(5)
  assert valid == docs_(4, prefix="val")


def test_gzipped_lists_and_text_and_byte_order_marks(tmp_path):
  """A .json.gz holding one JSON list, a .txt.gz, and files starting with a UTF-8 byte order
  mark are read (the list and the BOM'd JSON were refused, the .txt.gz left out, and a
  .txt's BOM began its first document)."""
  bom = b"\xef\xbb\xbf"
  d = tmp_path / "formats"
  d.mkdir()
  with gzip.open(d / "a.json.gz", "wt", encoding="utf-8") as f:
    json.dump([{"text": "gz list 0"}, "gz list 1"], f)
  (d / "b.jsonl").write_bytes(bom + write_jsonl(tmp_path / "b.jsonl", docs_(3)).read_bytes())
  with gzip.open(d / "c.txt.gz", "wt", encoding="utf-8") as f:
    f.write("txt gz 0\n\ntxt gz 1\n")
  (d / "d.txt").write_bytes(bom + b"\n\nbom txt 1\n\nbom txt 2\n")
  (d / "e.json").write_bytes(bom + json.dumps(["bom list"]).encode())
  write_jsonl(d / "valid.jsonl", docs_(2, prefix="val"))
  src = D.resolve_source(str(d))
  assert splits(src) == (["gz list 0", "gz list 1"] + docs_(3) + ["txt gz 0", "txt gz 1",
                          "bom txt 1", "bom txt 2", "bom list"], docs_(2, prefix="val"))
  # d.txt's documents keep their numbers (a saved position stays good): the BOM's empty
  # first block is still item 0.
  assert [c for c, _ in src.stream("train", cursor=(3, 0))] == [(3, 2), (3, 3), (4, 1)]
  # A .txt's BOM was the start of its first document: another BPE cache key (fingerprint),
  # the same files to resume in (listing), than for a file of the same size and time.
  marked, plain = [tmp_path / name for name in ("marked", "plain")]
  for root, data in ((marked, bom + b"a\n\nb\n"), (plain, b"\n\n\na\n\nb\n")):
    write_jsonl(root / "valid.jsonl", docs_(2, prefix="val"))
    (root / "d.txt").write_bytes(data)
    for name in ("d.txt", "valid.jsonl"):
      os.utime(root / name, (1e9, 1e9))
  src, other = D.resolve_source(str(marked)), D.resolve_source(str(plain))
  assert splits(src) == splits(other) == (["a", "b"], docs_(2, prefix="val"))
  assert other.listing == src.listing and other.fingerprint != src.fingerprint


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
  """A file name with a byte that is not UTF-8 (a Latin-1 "café.jsonl"): its documents are
  read (the source's fingerprint failed to encode the name, an error naming neither)."""
  d = tmp_path / "latin1"
  d.mkdir()
  with open(os.fsencode(d) + b"/caf\xe9.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"text": t}) + "\n" for t in docs_(20))
  write_jsonl(d / "validation.jsonl", docs_(3, prefix="val"))
  assert splits(D.resolve_source(str(d))) == (docs_(20), docs_(3, prefix="val"))


def test_a_test_file_in_a_directory_is_left_out(tmp_path):
  """train / validation / test files: the test split is neither trained on nor validation
  (it was trained on), and the warning names it."""
  d = tmp_path / "tvt"
  write_jsonl(d / "train.jsonl", docs_(10))
  write_jsonl(d / "validation.jsonl", docs_(4, prefix="val"))
  write_jsonl(d / "test.jsonl", docs_(5, prefix="tst"))
  with pytest.warns(UserWarning, match=r"leaving out 1 test file\(s\) \(test.jsonl\)"):
    src = D.resolve_source(str(d))
  train, valid = splits(src)
  assert sorted(train) == sorted(docs_(10)) and sorted(valid) == sorted(docs_(4, prefix="val"))


def test_datasets_metadata_in_a_directory_is_left_out(tmp_path):
  """datasets' dataset_dict.json / dataset_info.json / state.json and a manifest.json are
  no documents: left out with a warning naming them (they were read as documents, failing
  the run on their lines)."""
  d = tmp_path / "saved"
  (d / "train").mkdir(parents=True)
  (d / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
  (d / "train" / "dataset_info.json").write_text('{\n  "citation": "",\n  "features": {}\n}')
  (d / "train" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "x"}]}))
  (d / "manifest.json").write_text(json.dumps({"text": "a manifest, not a document"}))
  write_jsonl(d / "train" / "part-0.jsonl", docs_(20))
  write_jsonl(d / "validation" / "part-0.jsonl", docs_(3, prefix="val"))
  with pytest.warns(UserWarning, match=r"leaving out 4 metadata file\(s\) \(dataset_dict.json,"
                    r" manifest.json, train/dataset_info.json, \.\.\.\)"):
    src = D.resolve_source(str(d))
  assert splits(src) == (docs_(20), docs_(3, prefix="val"))
  for p in (d / "train" / "part-0.jsonl", d / "validation" / "part-0.jsonl"):
    p.unlink()
  with pytest.warns(UserWarning, match="metadata"), pytest.raises(
      ValueError, match=r"no .* files in .*saved besides metadata files$"):
    D.resolve_source(str(d))


def test_a_tokenizer_in_a_data_directory_is_left_out(tmp_path):
  """A tokenizer saved beside the data (debian.py's bpe-32000.json, a tokenizer.json) is no
  document: the directory that debian.py prepares failed as a plain path on its BPE."""
  d = tmp_path / "prepared"
  write_jsonl(d / "train-000.jsonl", docs_(20))
  write_jsonl(d / "validation.jsonl", docs_(3, prefix="val"))
  bpe = {"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": {}}}
  for name in ("bpe-32000.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json"):
    (d / name).write_text(json.dumps(bpe, indent=2))
  with pytest.warns(UserWarning, match=r"leaving out 4 tokenizer file\(s\) \(bpe-32000.json,"):
    src = D.resolve_source(str(d))
  assert splits(src) == (docs_(20), docs_(3, prefix="val"))


def test_a_broken_json_list_names_its_file(tmp_path):
  (tmp_path / "broken.json").write_text('[{"text": "a"}, ')
  with pytest.raises(ValueError, match=r"broken.json: not a JSON list of documents: Expecting"):
    splits(D.resolve_source(str(tmp_path / "broken.json")))


@pytest.mark.parametrize("files", ["empty.jsonl", "none*.jsonl"])
def test_hf_source_without_examples_is_one_line(tmp_path, monkeypatch, files):
  datasets = pytest.importorskip("datasets")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(ValueError, match=r"no examples to read \(empty files, or a pattern"):
    D.resolve_source(f"hf:json:{tmp_path / files}")


def test_hf_source_local_json(tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
  write_jsonl(tmp_path / "hf" / "part0.jsonl", docs_(60))
  write_jsonl(tmp_path / "hf" / "part1.jsonl", docs_(60, prefix="two"))
  spec = f"hf:json:{tmp_path / 'hf' / '*.jsonl'}"
  src = D.resolve_source(spec)
  train, valid = splits(src)
  assert valid and not set(train) & set(valid)
  assert sorted(train + valid) == sorted(docs_(60) + docs_(60, prefix="two"))
  assert splits(D.resolve_source(spec)) == (train, valid)
  # Resuming a stream mid-way (datasets' skip) gives the same documents.
  stream = list(src.stream("train"))
  cursor = stream[69][0]
  assert [t for _, t in src.stream("train", cursor, 70)] == [t for _, t in stream[70:]]
  if hasattr(datasets.IterableDataset, "shard"):  # a shard per data file
    assert cursor[0] == 1
  b = D.Batches(src, BYTES, seq_len=16, batch_size=4, seed=3, shuffle_window=16)
  ref = [next(b) for _ in range(8)]
  c = D.Batches(src, BYTES, seq_len=16, batch_size=4, seed=3, shuffle_window=16)
  for _ in range(5):
    next(c)
  d = D.Batches(src, BYTES, seq_len=16, batch_size=4, seed=3, shuffle_window=16)
  d.restore(c.state())
  np.testing.assert_array_equal(np.stack([next(d) for _ in range(3)]), np.stack(ref[5:]))


def test_hf_source_of_local_files_changes_its_keys_with_the_files(tmp_path, monkeypatch):
  """``hf:json:<files>``'s BPE cache key and listing were its spec alone: rewritten files
  reloaded the BPE trained on the old text, and a saved position was restored into them."""
  datasets = pytest.importorskip("datasets")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
  write_jsonl(tmp_path / "a" / "part0.jsonl", docs_(30))
  spec = f"hf:json:{tmp_path / 'a' / '*.jsonl'}"
  before = D.resolve_source(spec)
  write_jsonl(tmp_path / "a" / "part0.jsonl", docs_(31))  # one more document
  after = D.resolve_source(spec)
  assert after.fingerprint != before.fingerprint and after.listing != before.listing
  b = D.Batches(before, BYTES, seq_len=16, batch_size=4, seed=3)
  next(b)
  assert "differ from the run's" in D.Batches(after, BYTES, seq_len=16, batch_size=4,
                                              seed=3).refusal(b.state())
  (tmp_path / "b").mkdir()  # the same files elsewhere: the same listing
  os.replace(tmp_path / "a" / "part0.jsonl", tmp_path / "b" / "part0.jsonl")
  moved = D.resolve_source(f"hf:json:{tmp_path / 'b' / '*.jsonl'}")
  assert moved.listing == after.listing


def test_max_docs_does_not_move_a_data_position(tmp_path):
  """A resume with another --max-docs goes on (the README's word): the cap is not part of
  the listing (one saved with the cap in it, as before, is accepted under that cap)."""
  write_jsonl(tmp_path / "d" / "part0.jsonl", docs_(40))
  small, large = (D.resolve_source(str(tmp_path / "d"), max_docs=m) for m in (20, 25))
  assert small.listing == large.listing and small.fingerprint != large.fingerprint
  b = D.Batches(small, BYTES, seq_len=16, batch_size=4, seed=3)
  next(b)
  state = b.state()
  c = D.Batches(large, BYTES, seq_len=16, batch_size=4, seed=3)
  assert c.refusal(state) is None
  assert c.refusal({**state, "listing": large.listings[1]}) is None  # saved with its cap
  c.restore(state)
  next(c)


def test_default_embedded_corpus():
  root, files = sources._default_files()
  train_f, valid_f = files["train"], files["validation"]
  assert train_f and valid_f and not set(train_f) & set(valid_f)
  for fs in (train_f, valid_f):
    rel = [p.relative_to(root).as_posix() for p in fs]
    assert rel == sorted(rel)
    assert not any(part in {"site-packages", "test", "tests", "__pycache__"}
                   for r in rel for part in r.split("/"))
  assert 0.01 < len(valid_f) / (len(train_f) + len(valid_f)) < 0.15
  src = D.resolve_source("default", max_docs=20)
  train, valid = splits(src)
  assert len(train) == 20 and 0 < len(valid) <= 20
  assert all(0 < len(d) <= sources.MAX_DOC_CHARS for d in train + valid)
  assert splits(D.resolve_source("default", max_docs=20)) == (train, valid)
  assert src.name == "default" and src.skipped == 0



def test_default_validation_holds_no_training_document():
  """The library repeats some text in files of both splits (codec tables, a sample script):
  12 of CPython 3.11's 243 validation documents were also training documents."""
  src = D.resolve_source("default")
  train = set(src.documents("train"))
  valid = list(src.documents("validation"))
  assert len(valid) > 100 and not [d for d in valid if d in train]
  assert list(src.documents("validation")) == valid  # read again: the same, in order


LONG = "\n".join(f"line {i:03d} " + "z" * 40 for i in range(100))  # over MAX_DOC_CHARS


def fake_debian_root(root):
  """The two packages' files as Debian lays them out, gzipped, with what must be dropped:
  the dictionary's source-tag lines, the kernel's translations and device-tree bindings."""
  def gz(rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)

  entries = [f"Word{i} \\Word{i}\\, n.\n   Meaning number {i}. --Milton.\n   [1913 Webster]\n"
             f"   [WordNet 1.5]" for i in range(3000)]
  gz(debian.GCIDE, "\n\n".join(entries) + "\n")
  docs = "usr/share/doc/linux-doc-6.1/Documentation"
  paras = {f"{docs}/a/intro.rst.gz": [f"Intro paragraph {i} " + "x" * (i * 37 % 900)
                                      for i in range(40)],
           f"{docs}/b.txt.gz": ["Plain text.", LONG]}
  for rel, ps in paras.items():
    gz(rel, "\n\n".join(ps) + "\n")
  gz(f"{docs}/translations/zh_CN/intro.rst.gz", "翻译")
  gz(f"{docs}/devicetree/bindings/x.txt.gz", "compatible = \"vendor,chip\";")
  gz(f"{docs}/ABI/sysfs-x.gz", "What: /sys/x")  # no .rst / .txt: left out
  return [e.replace("\n   [1913 Webster]\n   [WordNet 1.5]", "") for e in entries], paras


def test_debian_docs_prepared_corpus(tmp_path):
  entries, paras = fake_debian_root(tmp_path / "root")
  out = tmp_path / "prepared"
  with pytest.raises(FileNotFoundError, match="examples.llama.data.debian --download"):
    D.resolve_source(f"debian-docs:{out}")
  manifest = debian.prepare(tmp_path / "root", out, {"dict-gcide": "0.48"})
  src = D.resolve_source(f"debian-docs:{out}")
  train, valid = splits(src)
  assert src.name == f"debian-docs:{out}" and train and valid
  assert len(set(train + valid)) == len(train + valid)
  assert all(0 < len(d) <= sources.MAX_DOC_CHARS for d in train + valid)
  text = "\n\n".join(train + valid)
  assert "[1913 Webster]" not in text and "[WordNet" not in text
  assert "翻译" not in text and "vendor,chip" not in text and "/sys/x" not in text
  # Every dictionary entry and kernel paragraph is in exactly one document, whole (the long
  # one cut at its line boundaries).
  pieces = [p for d in train + valid for p in d.split("\n\n")]
  want = entries + [p for ps in paras.values() for p in ps if len(p) <= sources.MAX_DOC_CHARS]
  assert sorted(p for p in pieces if not p.startswith("line ")) == sorted(want)
  assert "\n".join(sorted(p for p in pieces if p.startswith("line "))) == LONG
  # Shuffled, not in the dictionary's order; the manifest counts what was written.
  gcide = [d for d in train if d.startswith("Word")]
  assert gcide != sorted(gcide, key=lambda d: int(d[4:d.index(" ")]))
  counts = manifest["counts"]
  for split, docs in (("train", train), ("validation", valid)):
    assert sum(c[split]["documents"] for c in counts.values() if split in c) == len(docs)
    assert sum(c[split]["chars"] for c in counts.values() if split in c) == sum(map(len, docs))
  assert manifest["packages"] == {"dict-gcide": "0.48"}
  assert json.loads((out / "manifest.json").read_text()) == manifest
  with pytest.raises(FileNotFoundError, match="linux-doc.*--download"):
    debian.prepare(tmp_path / "nothing", out)


@pytest.mark.parametrize("argv, code, match", [
    (["--count", "bytes", "--data", "{tmp}/empty.txt"], 2, r"empty\.txt.*no documents"),
    (["--count", "bytes,"], 2, r"--count: expected a comma list of tokenizers"),
    (["--bpe-vocab", "-5"], 2, r"--bpe-vocab: expected 0 \(no BPE\) or at least 259"),
    (["--count", "bytes", "--out", "{tmp}/missing"], 2, r"examples.llama.data.debian --download"),
])
def test_debian_command_errors_are_one_line(tmp_path, capsys, argv, code, match):
  """debian.py's errors in the command: a traceback (an empty --data, an empty tokenizer
  name that counted the working directory) or, for --bpe-vocab -5, a refusal only after
  the corpus was prepared; now one line on stderr, exit code 2, before any work."""
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(SystemExit) as exit_info:
    sys.exit(debian.run([a.format(tmp=tmp_path) for a in argv]))
  err = capsys.readouterr().err
  assert exit_info.value.code == code and "Traceback" not in err, err
  assert re.search(match, err.strip().splitlines()[-1]), err  # (argparse's usage above it)


# --------------------------------------------------------------------------- tokenizers


def test_bytes_tokenizer():
  tok = D.load_tokenizer("bytes")
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (260, 256, 257, 258)
  text = "héllo, wörld ✓\n"
  (ids,) = tok.encode_batch([text])
  assert ids[-1] == tok.eos_id and max(ids) < 260
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids + [tok.pad_id] * 3, np.int32)) == text


def test_bpe_trains_once_then_loads_from_cache(tmp_path, monkeypatch):
  src = corpus(tmp_path, n=80)
  calls = []
  train = tokenizers._train_bpe
  monkeypatch.setattr(tokenizers, "_train_bpe", lambda *a: calls.append(1) or train(*a))
  tok = D.load_tokenizer("bpe", source=src, vocab_size=300, cache_dir=tmp_path / "cache")
  assert calls == [1] and 259 < tok.vocab_size <= 300
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert len(list((tmp_path / "cache").glob("*.json"))) == 1
  text = "doc012 w5 w12 — ünïcode\n  indented"
  (ids,) = tok.encode_batch([text])
  assert ids[-1] == tok.eos_id and len(ids) < len(text.encode()) and tok.decode(ids) == text
  again = D.load_tokenizer("bpe", source=src, vocab_size=300, cache_dir=tmp_path / "cache")
  assert calls == [1] and again.encode_batch([text]) == [ids] and again.name == tok.name
  D.load_tokenizer("bpe", source=src, vocab_size=280, cache_dir=tmp_path / "cache")
  assert calls == [1, 1]  # another vocab size is another tokenizer
  with pytest.raises(ValueError, match="source"):
    D.load_tokenizer("bpe", vocab_size=300, cache_dir=tmp_path / "cache")
  # Data too small for the size asked: said (trained and loaded), not left to the name.
  for _ in range(2):
    with pytest.warns(UserWarning, match=r"the BPE has \d+ tokens, fewer than vocab_size=100000"
                      r" \(too little data\)"):
      small = D.load_tokenizer("bpe", source=src, vocab_size=100000, cache_dir=tmp_path / "cache")
  assert small.vocab_size < 1000


def test_load_tokenizer_by_path(tmp_path):
  src = corpus(tmp_path)
  tok = D.load_tokenizer("bpe", source=src, vocab_size=290, cache_dir=tmp_path / "cache")
  text = "doc003 w1 w2 w3"
  (ids,) = tok.encode_batch([text])
  tok.hf.save(str(tmp_path / "tok.json"))
  (tmp_path / "saved").mkdir()
  tok.hf.save(str(tmp_path / "saved" / "tokenizer.json"))
  transformers = pytest.importorskip("transformers")
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok.hf, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
  fast.save_pretrained(str(tmp_path / "pretrained"))
  for path in ("tok.json", "saved", "pretrained"):
    loaded = D.load_tokenizer(str(tmp_path / path))
    assert (loaded.pad_id, loaded.eos_id, loaded.bos_id) == (0, 2, 1), path
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch([text]) == [ids] and loaded.decode(ids) == text


def test_text_that_spells_a_special_token_is_encoded_as_text(tmp_path):
  """A document holding "<pad>", "</s>" or a sentinel such as t5-base's "<extra_id_0>" (ids
  past the 32,000 of the papers' model) is text: encoded as such, not as those ids (a pad id
  masked out of the loss, an end of document mid-document, an id with no embedding row)."""
  src = corpus(tmp_path)
  tok = D.load_tokenizer("bpe", source=src, vocab_size=290, cache_dir=tmp_path / "cache")
  words = tok.vocab_size
  import tokenizers as hf_tokenizers  # pylint: disable=import-outside-toplevel
  tok.hf.add_special_tokens([hf_tokenizers.AddedToken("<extra_id_0>", special=True)])
  tok.hf.save(str(tmp_path / "t5like.json"))
  loaded = D.load_tokenizer(str(tmp_path / "t5like.json"))
  assert loaded.vocab_size == words + 1
  text = 'x = "<pad>" if a </s> b else "<extra_id_0>" <s>'
  (ids,) = loaded.encode_batch([text])
  assert ids[-1] == loaded.eos_id and max(ids[:-1]) < words
  assert not {loaded.pad_id, loaded.eos_id, loaded.bos_id} & set(ids[:-1])
  assert loaded.decode(ids) == text


def _empty_hf_cache(monkeypatch, tmp_path):
  cache = tmp_path / "hf_home"
  cache.mkdir(exist_ok=True)
  for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("HF_HOME", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return cache / "hub"


def test_t5_base_absent_is_a_clear_error(tmp_path, monkeypatch):
  _empty_hf_cache(monkeypatch, tmp_path)
  with pytest.raises(FileNotFoundError, match=r"t5-base(.|\n)*download(.|\n)*bpe"):
    D.load_tokenizer("t5-base")
  src = corpus(tmp_path)
  auto = D.load_tokenizer("auto", source=src, vocab_size=270, cache_dir=tmp_path / "cache")
  assert auto.name.startswith("bpe")


def test_t5_base_from_local_cache(tmp_path, monkeypatch):
  hub = _empty_hf_cache(monkeypatch, tmp_path)
  src = corpus(tmp_path)
  tok = D.load_tokenizer("bpe", source=src, vocab_size=270, cache_dir=tmp_path / "cache")
  model = hub / "models--google-t5--t5-base"
  (model / "refs").mkdir(parents=True)
  (model / "refs" / "main").write_text("abc123")
  (model / "snapshots" / "abc123").mkdir(parents=True)
  tok.hf.save(str(model / "snapshots" / "abc123" / "tokenizer.json"))
  for spec in ("t5-base", "auto"):
    t5 = D.load_tokenizer(spec, source=src)
    assert t5.name == "t5-base"
    assert t5.encode_batch(["doc001 w7"]) == tok.encode_batch(["doc001 w7"])


def test_t5_snapshot_without_a_loadable_tokenizer_is_passed_over(tmp_path, monkeypatch):
  """A snapshot holding only spiece.model counted as cached t5-base: without sentencepiece
  to convert it ``auto`` failed instead of training its BPE; and ``refs/main``'s snapshot
  was taken over an older one that holds the tokenizer.json."""
  hub = _empty_hf_cache(monkeypatch, tmp_path)
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "sentencepiece" else find_spec(name, *a))
  src = corpus(tmp_path)
  model = hub / "models--google-t5--t5-base"
  (model / "refs").mkdir(parents=True)
  (model / "refs" / "main").write_text("new")
  (model / "snapshots" / "new").mkdir(parents=True)
  (model / "snapshots" / "new" / "spiece.model").write_bytes(b"not converted here")
  auto = D.load_tokenizer("auto", source=src, vocab_size=270, cache_dir=tmp_path / "cache")
  assert auto.name.startswith("bpe")
  (model / "snapshots" / "old").mkdir()
  auto.hf.save(str(model / "snapshots" / "old" / "tokenizer.json"))
  assert D.load_tokenizer("auto", source=src).name == "t5-base"


# --------------------------------------------------------------------------- batches


def test_batches_pad_and_truncate(tmp_path):
  texts = ["a" * i for i in range(1, 40)]
  d = tmp_path / "d"
  write_jsonl(d / "train.jsonl", [f"{i:03d}{t}" for i, t in enumerate(texts)])
  write_jsonl(d / "val.jsonl", ["v"])
  src = D.resolve_source(str(d))
  b = D.Batches(src, BYTES, seq_len=16, batch_size=13)
  rows = np.concatenate([next(b) for _ in range(3)])  # one epoch
  assert rows.dtype == np.int32 and rows.shape == (39, 16)
  seen = []
  for row in rows:
    i = int(BYTES.decode(row[:3]))
    doc = list(f"{i:03d}{texts[i]}".encode()) + [BYTES.eos_id]
    if len(doc) <= 16:
      np.testing.assert_array_equal(row, doc + [BYTES.pad_id] * (16 - len(doc)))
    else:  # truncated, keeping the final eos (as the reference's tokenizer call)
      np.testing.assert_array_equal(row, doc[:15] + [BYTES.eos_id])
    seen.append(i)
  assert sorted(seen) == list(range(39)) and seen != list(range(39))  # shuffled, each once


def test_long_documents_tokenize_a_prefix_only():
  class WordTok:  # one id per word
    eos_id = 0

    def encode_batch(self, texts):
      return [[1 + len(w) for w in t.split()] + [0] for t in texts]

  tok, T = WordTok(), 8
  short_words = " ".join(f"w{i % 10}" for i in range(2000))  # prefix has plenty of words
  long_words = " ".join(["y" * 40] * 100)  # the prefix has too few: grown until it has
  one_word = "z" * 5000  # no word ends in any prefix: the whole text
  for text in (short_words, long_words, one_word):
    (ids,) = batches._encode(tok, [text], T)
    assert batches._fit(ids, T, tok) == batches._fit(tok.encode_batch([text])[0], T, tok)
  assert len(batches._encode(tok, [short_words], T)[0]) < 2001
  assert len(batches._encode(tok, [long_words], T)[0]) == 26  # 1024 characters: 25 words
  assert len(batches._encode(tok, [one_word], T)[0]) == 2


def test_a_long_word_across_the_prefix_cut_keeps_its_tokens(tmp_path):
  """Of a long document only a prefix is tokenized, and a Unigram's best split of a word
  depends on where the word ends: a prefix cut inside a long run of '=' (a heading's
  underline) split the run's start otherwise than the whole document, and a kept token
  changed."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  words = ["alpha", "beta", "gamma", "delta", "title", "body", "end"]
  unigram = Tokenizer(models.Unigram())  # split as t5-base's: at whitespace, '▁' marking words
  unigram.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                   pre_tokenizers.Metaspace()])
  unigram.train_from_iterator(
      [f"{words[i % 7]} {'=' * (3 + i % 40)} {words[i * 3 % 7]} {'-' * (2 + i % 23)}"
       for i in range(300)],
      trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "<s>", "</s>"],
                              unk_token="<unk>", show_progress=False))
  unigram.save(str(tmp_path / "unigram.json"))
  tok = D.load_tokenizer(str(tmp_path / "unigram.json"))
  doc = "title " + "=" * 1000 + " body" * 50  # the prefix of seq_len 16: 512 characters
  write_jsonl(tmp_path / "d" / "train.jsonl", [doc])
  write_jsonl(tmp_path / "d" / "valid.jsonl", ["v"])
  (row,) = next(D.Batches(D.resolve_source(str(tmp_path / "d")), tok, seq_len=16,
                          batch_size=1))
  assert row.tolist() == tok.encode_batch([doc])[0][:15] + [tok.eos_id]


def test_batches_pack(tmp_path):
  src = corpus(tmp_path, n=25)
  b = D.Batches(src, BYTES, seq_len=32, batch_size=4, pack=True, seed=1)
  rows = np.concatenate([next(b) for _ in range(6)])
  assert rows.shape == (24, 32) and not (rows == BYTES.pad_id).any()
  stream = rows.reshape(-1).tolist()
  cuts = [i for i, t in enumerate(stream) if t == BYTES.eos_id]
  pieces = [BYTES.decode(stream[a + 1:z]) for a, z in zip([-1] + cuts, cuts)]
  assert len(pieces) >= 25 and sorted(pieces[:25]) == sorted(docs_(25))  # an epoch, whole
  assert pieces[:25] != docs_(25)


def test_batches_seed_and_epochs(tmp_path):
  src = corpus(tmp_path, n=10)

  def first(seed, k=4):
    b = D.Batches(src, BYTES, seq_len=8, batch_size=5, seed=seed)
    return [next(b) for _ in range(k)]

  a, again, other = first(0), first(0), first(1)
  np.testing.assert_array_equal(np.stack(a), np.stack(again))
  assert not np.array_equal(np.stack(a), np.stack(other))
  ids = [doc_id(r) for batch in a for r in batch]
  epoch0, epoch1 = ids[:10], ids[10:]
  assert sorted(epoch0) == sorted(epoch1) == sorted(d[:6] for d in docs_(10))
  assert epoch0 != epoch1  # a new permutation every epoch


@pytest.mark.parametrize("pack", [False, True])
def test_resume_equivalence(tmp_path, pack):
  src = corpus(tmp_path, n=23)
  make = lambda: D.Batches(src, BYTES, seq_len=12, batch_size=3, seed=5, pack=pack,
                           shuffle_window=5)
  b = make()
  ref = [next(b) for _ in range(40)]  # several windows and epochs
  assert b.state()["epoch"] >= 2
  for k in list(range(0, 30)):
    b = make()
    for _ in range(k):
      next(b)
    state = json.loads(json.dumps(b.state()))
    assert state["batches"] == k
    c = make()
    c.restore(state)
    assert c.state() == state
    np.testing.assert_array_equal(np.stack([next(c) for _ in range(4)]), np.stack(ref[k:k + 4]))
  with pytest.raises(ValueError, match="seed"):
    D.Batches(src, BYTES, seq_len=12, batch_size=3, seed=6, pack=pack).restore(state)
  with pytest.warns(UserWarning, match="source"):  # e.g. the same data under another path
    make().restore({**state, "source": "elsewhere"})


def test_a_state_names_its_tokenizer_and_files(tmp_path):
  """A saved position continues only with the same tokenizer (by what its ids mean, not its
  name) and the same files (names and sizes: a copy elsewhere, with new times, is the same);
  another BPE, or a file added to the directory, is refused in words."""
  d = tmp_path / "corpus"
  write_jsonl(d / "part-1.jsonl", docs_(30))
  write_jsonl(d / "valid.jsonl", docs_(6, prefix="val"))
  src = D.resolve_source(str(d))
  bpe = D.load_tokenizer("bpe", source=src, vocab_size=290, cache_dir=tmp_path / "cache")
  b = D.Batches(src, bpe, seq_len=12, batch_size=3, seed=5, shuffle_window=5)
  next(b)
  state = json.loads(json.dumps(b.state()))
  (tmp_path / "copy").mkdir()
  for f in d.iterdir():  # the same files under another path, written now
    (tmp_path / "copy" / f.name).write_bytes(f.read_bytes())
  same = D.resolve_source(str(tmp_path / "copy"))
  renamed = tokenizers.Tokenizer("other-name", bpe.vocab_size, bpe.pad_id, bpe.eos_id,
                                 bpe.bos_id, hf=bpe.hf)
  again = D.Batches(same, renamed, seq_len=12, batch_size=3, seed=5, shuffle_window=5)
  assert again.refusal(state) is None
  with pytest.warns(UserWarning):  # (another source name and tokenizer name: a warning)
    again.restore(state)
  other_bpe = D.load_tokenizer("bpe", source=corpus(tmp_path, n=50, name="other"),
                               vocab_size=290, cache_dir=tmp_path / "cache")
  with pytest.raises(ValueError, match="tokenizer .* is not the one the run was trained"):
    D.Batches(src, other_bpe, seq_len=12, batch_size=3, seed=5, shuffle_window=5).restore(state)
  write_jsonl(d / "part-0.jsonl", docs_(5, prefix="new"))  # sorts first: moves the position
  grown = D.resolve_source(str(d))
  with pytest.raises(ValueError, match="files of data source .* differ"):
    D.Batches(grown, bpe, seq_len=12, batch_size=3, seed=5, shuffle_window=5).restore(state)


def test_resume_with_max_docs(tmp_path):
  corpus(tmp_path, n=23)
  src = D.resolve_source(str(tmp_path / "corpus"), max_docs=17)
  make = lambda: D.Batches(src, BYTES, seq_len=12, batch_size=4, seed=2, shuffle_window=6)
  b = make()
  ref = [next(b) for _ in range(12)]
  assert sorted({doc_id(r) for x in ref for r in x}) == sorted(d[:6] for d in docs_(17))
  b = make()
  for _ in range(7):
    next(b)
  c = make()
  c.restore(json.loads(json.dumps(b.state())))
  np.testing.assert_array_equal(np.stack([next(c) for _ in range(5)]), np.stack(ref[7:]))


def test_eval_batches_budget_and_stability(tmp_path):
  d = tmp_path / "e"
  write_jsonl(d / "train.jsonl", docs_(5))
  write_jsonl(d / "validation.jsonl", docs_(50, prefix="val"))
  src = D.resolve_source(str(d))
  evals = D.eval_batches(src, BYTES, seq_len=16, batch_size=4, eval_tokens=200)
  counts = [int((x[:, 1:] != BYTES.pad_id).sum()) for x in evals]
  assert sum(counts) >= 200 and sum(counts[:-1]) < 200
  assert all(x.shape == (4, 16) and x.dtype == np.int32 for x in evals)
  assert [doc_id(r) for r in evals[0]] == [t[:6] for t in docs_(4, prefix="val")]  # in order
  again = D.eval_batches(src, BYTES, seq_len=16, batch_size=4, eval_tokens=200)
  assert all(np.array_equal(x, y) for x, y in zip(evals, again)) and len(again) == len(evals)
  with pytest.warns(UserWarning, match="fewer than eval_tokens"):
    everything = D.eval_batches(src, BYTES, seq_len=16, batch_size=4, eval_tokens=10**9)
  assert len(everything) == 13 and (everything[-1][2:] == BYTES.pad_id).all()
  # No target token at all (pad = eos, and rows of 2 tokens end in eos): an evaluation
  # would report loss 0 and perplexity 1, so it is refused.
  pad_is_eos = dataclasses.replace(BYTES, pad_id=BYTES.eos_id)
  with pytest.raises(ValueError, match="validation split has no target token"):
    D.eval_batches(src, pad_is_eos, seq_len=2, batch_size=4, eval_tokens=200)


# --------------------------------------------------------------------------- bad input


def test_counts_that_are_no_counts_are_one_line(tmp_path):
  """eval_batches took batch_size 0 or -2 (rows piled up to the budget in one batch),
  eval_tokens 0 (one document) or nan (the whole split); max_docs 1.5 took two documents
  and '3' failed comparing; a seed of 1.5 or 'a' was taken."""
  d = tmp_path / "e"
  write_jsonl(d / "train.jsonl", docs_(5))
  write_jsonl(d / "validation.jsonl", docs_(50, prefix="val"))
  src = D.resolve_source(str(d))
  for kw, name in [(dict(batch_size=0), "batch_size"), (dict(batch_size=-2), "batch_size"),
                   (dict(eval_tokens=0), "eval_tokens"), (dict(eval_tokens=float("nan")),
                                                           "eval_tokens"),
                   (dict(seq_len=2.5), "seq_len")]:
    with pytest.raises(ValueError, match=rf"^{name} must be an int >= "):
      D.eval_batches(src, BYTES, **{"seq_len": 16, "batch_size": 4, "eval_tokens": 200, **kw})
  for max_docs in (1.5, "3", True):
    with pytest.raises(ValueError, match=r"^max_docs must be an int >= 1"):
      D.resolve_source(str(d), max_docs=max_docs)
  for seed in (1.5, "a", -1):
    with pytest.raises(ValueError, match=r"^seed must be an int >= 0"):
      D.Batches(src, BYTES, seq_len=16, batch_size=4, seed=seed)
  with pytest.raises(ValueError, match=r"^batch_size must be an int >= 1"):
    D.Batches(src, BYTES, seq_len=16, batch_size=2.0)



def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    D.resolve_source(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    D.resolve_source(f"c4:{tmp_path / 'nowhere'}")
  with pytest.raises(FileNotFoundError, match="hf:allenai/c4"):
    D.resolve_source("allenai/c4")
  with pytest.raises(FileNotFoundError, match="no_tok.json"):
    D.load_tokenizer(str(tmp_path / "no_tok.json"))
  # A pattern is no path (the shell left it unexpanded): said, with the source that takes one;
  # "c4:" and "" were the working directory.
  with pytest.raises(FileNotFoundError, match=r"\(files by a pattern: 'hf:json:.*/\*.jsonl', or"):
    D.resolve_source(str(tmp_path / "*.jsonl"))
  for spec in ("c4:", ""):
    with pytest.raises(ValueError, match=f"^data source '{spec}': expected a path, c4:<dir>"):
      D.resolve_source(spec)


def test_empty_corpus(tmp_path):
  (tmp_path / "empty.txt").write_text("\n\n  \n")
  with pytest.raises(ValueError, match="empty.txt.*no documents"):
    D.resolve_source(str(tmp_path / "empty.txt"))
  (tmp_path / "nodata").mkdir()
  (tmp_path / "nodata" / "readme.md").write_text("x")
  with pytest.raises(ValueError, match="nodata"):
    D.resolve_source(str(tmp_path / "nodata"))
  c4 = tmp_path / "c4only"
  write_jsonl(c4 / "c4-train.00000-of-00001.json.gz", docs_(3), gz=True)
  with pytest.raises(ValueError, match="c4only.*'validation'"):
    D.resolve_source(str(c4))
  d = tmp_path / "novalid"
  write_jsonl(d / "train.jsonl", docs_(3))
  write_jsonl(d / "valid.jsonl", [""])
  with pytest.raises(ValueError, match="novalid.*'validation'"):
    D.resolve_source(str(d))
  # One small file: its hash split holds no validation document, and the error says why.
  write_jsonl(tmp_path / "one.jsonl", ["hello"])
  with pytest.raises(ValueError, match=r"one.jsonl' has no documents in its 'validation' split "
                     r"\(with no file named val / valid / validation / eval, 5% of the documents"):
    D.resolve_source(str(tmp_path / "one.jsonl"))


def test_what_a_file_starts_with_is_checked_when_the_source_is_made(tmp_path):
  """Unreadable files, and a first line that is no document, fail now, naming the file, the
  line or the byte: not mid-run, as they did in a file after the first."""
  d = tmp_path / "bad"
  write_jsonl(d / "a.jsonl", docs_(30))
  write_jsonl(d / "val.jsonl", docs_(3, prefix="val"))
  (d / "z.txt").write_bytes(b"\n\nfine start \xff\xfe not utf-8\n")
  with pytest.raises(ValueError, match=r"z.txt: not UTF-8 text \(invalid start byte at byte 13"):
    D.resolve_source(str(d))
  (d / "z.txt").unlink()
  (d / "w.jsonl").write_text('\n{"txt": "no text field"}\n{"text": "ok"}\n')
  with pytest.raises(ValueError, match=r"w.jsonl:2: not a JSON object with a string \"text\""):
    D.resolve_source(str(d))
  (d / "w.jsonl").write_text('{"text": "lone \\ud800 surrogate"}\n')
  with pytest.raises(ValueError, match=r"w.jsonl:1: .*lone surrogate"):
    D.resolve_source(str(d))
  (d / "w.jsonl").unlink()
  (d / "x.json").write_text('[{"text": "ok"}, {"txt": "item 1 has no text"}]')
  with pytest.raises(ValueError, match=r"x.json: item 1: not a JSON object"):
    D.resolve_source(str(d))
  (d / "x.json").unlink()
  with gzip.open(d / "x.jsonl.gz", "wb") as f:
    f.write(b'{"text": "ok"}\n' * 100)
  (d / "x.jsonl.gz").write_bytes((d / "x.jsonl.gz").read_bytes()[:10])
  with pytest.raises(ValueError, match=r"x.jsonl.gz: corrupt file \(EOFError"):
    D.resolve_source(str(d))
  (d / "x.jsonl.gz").unlink()
  os.symlink(d / "gone.txt", d / "y.txt")  # listed but cannot be opened
  with pytest.raises(OSError, match="cannot read .*y.txt"):
    D.resolve_source(str(d))
  (d / "y.txt").unlink()
  if os.geteuid() != 0:  # root reads anything
    write_jsonl(d / "x.jsonl", ["ok"]).chmod(0)
    with pytest.raises(OSError, match="cannot read .*x.jsonl"):
      D.resolve_source(str(d))


def test_bad_lines_found_mid_run_are_skipped_with_a_warning_and_counted(tmp_path):
  """A bad line or block after a file's first (not JSON, no "text", a lone surrogate, not
  UTF-8) is skipped, warned about once per file naming the file and line, and counted in
  ``skipped``, as C4's are: training went on to crash there with a ValueError mid-run."""
  d = tmp_path / "bad"
  write_jsonl(d / "a.jsonl", docs_(30))
  write_jsonl(d / "val.jsonl", docs_(3, prefix="val"))
  good = docs_(3, prefix="b")
  (d / "b.jsonl").write_text("\n".join([
      json.dumps({"text": good[0]}), "{not json", json.dumps({"txt": "no text field"}),
      json.dumps({"text": good[1]}), json.dumps({"text": "lone \ud800 escape"}),
      json.dumps({"text": good[2]})]) + "\n")
  (d / "c.txt").write_bytes(b"first block\n\nsecond \xff\xfe block\nstill\n\nthird block\n")
  far = "".join(json.dumps({"text": f"doc {i} " + "x" * 50}) + "\n" for i in range(400))
  (d / "d.jsonl").write_bytes(far.encode() + b'{"text": "\xff"}\n{"text": "last"}\n')
  src = D.resolve_source(str(d))
  with pytest.warns(UserWarning) as record:
    train = list(src.documents("train"))
  messages = [str(w.message) for w in record]
  assert len(messages) == 3, messages  # once per file
  assert "b.jsonl: line 2: Expecting property name" in messages[0]
  assert "c.txt: line 3: not UTF-8 text (invalid bytes at byte 20)" in messages[1]
  # its line, and its byte in the file (not in the text reader's chunk)
  assert (f"d.jsonl: line 401: not UTF-8 text (invalid bytes at byte {len(far) + 10})"
          in messages[2])
  assert src.skipped == 3 and src.skipped_parts == 5  # b.jsonl: 3 lines; c.txt, d.jsonl: 1
  assert train == (docs_(30) + good + ["first block", "third block"]
                   + [json.loads(line)["text"] for line in far.splitlines()] + ["last"])
  with warnings.catch_warnings():  # reading again warns no more and counts no more
    warnings.simplefilter("error")
    assert list(src.documents("train")) == train
  assert src.skipped == 3 and src.skipped_parts == 5


def test_bad_arguments(tmp_path):
  src = corpus(tmp_path)
  with pytest.raises(ValueError, match="seq_len"):
    D.Batches(src, BYTES, seq_len=1, batch_size=2)
  with pytest.raises(ValueError, match="split"):
    list(src.documents("test"))
  with pytest.raises(ValueError, match="max_docs"):
    D.resolve_source(str(tmp_path / "corpus"), max_docs=0)
  with pytest.raises(ValueError, match="259"):
    D.load_tokenizer("bpe", source=src, vocab_size=100, cache_dir=tmp_path)
  (tmp_path / "junk.json").write_text("{ not a tokenizer")
  with pytest.raises(ValueError, match="junk.json"):
    D.load_tokenizer(str(tmp_path / "junk.json"))
