r"""English text from Debian's package registry: the ``debian-docs`` corpus, prepared once.

Two Debian documentation packages hold 57.6M characters of English (``PACKAGES``):

  dict-gcide   the GNU Collaborative International Dictionary of English (Webster's 1913
               revised, with WordNet glosses): definitions, etymologies and quotations
               from English literature, 35.5M characters once its source-tag lines
               ("[1913 Webster]") are dropped.
  linux-doc    (its linux-doc-<version>, 6.1 on Debian 12) the Linux kernel's
               documentation, 22.1M characters of English reStructuredText / text; the
               translations and the device-tree bindings are left out.

``prepare`` cuts them at paragraph boundaries into documents of at most ``MAX_DOC_CHARS``,
holds out ~5% (by a hash of the text) for validation, shuffles the rest with a stable hash
(the dictionary is alphabetical: unshuffled, training would walk through it A to Z) and
writes gzipped JSON lines, ``train-NNN.jsonl.gz`` and ``validation.jsonl.gz``, a
``manifest.json`` and the BPE that ``--tokenizer bpe`` trains on it (``bpe-32000.json``):
about 23 MB, carried to a machine without the registry (a GPU) with the repository.
``--data debian-docs[:DIR]`` reads them (``sources.py``; DIR defaults to
``runs/data/debian-docs``). Build it once where Debian's registry is reachable:

  python -m examples.llama.data.debian --download --out runs/data/debian-docs

(``--download``: ``apt-get download`` into a temporary directory, unpacked with
``dpkg-deb``, nothing installed; without it the installed packages are read; ``--debs DIR``
reads ``.deb`` files already downloaded.)  Tokens (Debian 12's packages; ``--count
bytes,bpe``): 15.1M BPE-32000 tokens in training documents (7.65M as truncated 256-token
rows), 0.82M in validation; 54.7M bytes.  examples/llama/README.md has the table.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import pathlib
import re
import subprocess
import sys
import tempfile

from examples.llama.data.sources import (DEBIAN_DOCS_DIR, MAX_DOC_CHARS, VALID_FRACTION, chunks,
                                         digest)
from examples.llama.data.tokenizers import MIN_BPE_VOCAB

PACKAGES = ("dict-gcide", "linux-doc")
GCIDE = "usr/share/dictd/gcide.dict.dz"  # dictzip: a gzip file
KERNEL_DOCS = "usr/share/doc/linux-doc-*/Documentation"
_KERNEL_SKIP = ("translations", "devicetree/bindings")  # not English / mostly schemas
_KERNEL_SUFFIXES = (".rst.gz", ".txt.gz")
# A line that is only a source tag of the dictionary: [1913 Webster], [WordNet 1.5], [PJC], ...
_TAG_LINE = re.compile(r"^[ \t]*\[[^\]\n]{1,40}\][ \t]*\n", re.MULTILINE)
SHARD_DOCS = 4096  # documents per train file


def pack(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
  r"""``text``'s blank-line-separated paragraphs, joined greedily into documents of at most
  ``max_chars`` (a longer paragraph is cut at line boundaries, ``sources.chunks``).

  >>> pack("a b\n\nc\n\n\nd e f", max_chars=6)
  ['a b\n\nc', 'd e f']
  """
  docs, current = [], ""
  for para in re.split(r"\n[ \t\r\f\v]*\n", text):
    para = para.strip("\n")
    for piece in (chunks(para, max_chars) if len(para) > max_chars else [para]):
      piece = piece.strip("\n")
      if not piece.strip():
        continue
      if current and len(current) + 2 + len(piece) <= max_chars:
        current += "\n\n" + piece
      else:
        if current:
          docs.append(current)
        current = piece
  return docs + ([current] if current else [])


def gcide_text(raw: str) -> str:
  r"""The dictionary's text without its source-tag lines.

  >>> gcide_text("Affear, v. t.\n   To frighten. --Spenser.\n   [1913 Webster]\n")
  'Affear, v. t.\n   To frighten. --Spenser.\n'
  """
  return _TAG_LINE.sub("", raw)


def documents(root: pathlib.Path) -> dict[str, list[str]]:
  """The documents of each package under ``root`` (``/`` for the installed packages, or
  where ``.deb`` files were unpacked), in a fixed order; a missing package is an error."""
  gcide = root / GCIDE
  kernel = sorted(glob.glob(str(root / KERNEL_DOCS)))
  missing = [name for name, ok in zip(PACKAGES, (gcide.is_file(), bool(kernel))) if not ok]
  if missing:
    raise FileNotFoundError(
        f"{', '.join(missing)} not found under {root} ({GCIDE}, {KERNEL_DOCS}): pass "
        f"--download (apt-get download), --debs DIR, or apt-get install {' '.join(missing)}")
  out = {"dict-gcide": pack(gcide_text(_read_gz(gcide)))}
  docs_dir = pathlib.Path(kernel[-1])
  skipped = lambda p: p.relative_to(docs_dir).as_posix().startswith(_KERNEL_SKIP)
  files = sorted(p for p in docs_dir.rglob("*")
                 if p.name.endswith(_KERNEL_SUFFIXES) and not skipped(p))
  out["linux-doc"] = [d for p in files for d in pack(_read_gz(p))]
  return out


def _read_gz(path: pathlib.Path) -> str:
  with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
    return f.read()


def _order(text: str) -> str:
  return digest("debian-docs|" + text)


def prepare(root: pathlib.Path, out: pathlib.Path, versions: dict | None = None) -> dict:
  """Writes the corpus of ``documents(root)`` into ``out`` (``train-NNN.jsonl.gz``,
  ``validation.jsonl.gz``, ``manifest.json``) and returns the manifest: per package and
  split, documents and characters.  The split and the order hash the text: the same
  files on every machine."""
  docs = documents(root)
  split = {"train": [], "validation": []}
  counts = {}
  for package, texts in docs.items():
    for text in texts:
      s = "validation" if int(_order(text)[:16], 16) / 2.0**64 < VALID_FRACTION else "train"
      split[s].append(text)
      c = counts.setdefault(package, {}).setdefault(s, {"documents": 0, "chars": 0})
      c["documents"] += 1
      c["chars"] += len(text)
  out.mkdir(parents=True, exist_ok=True)
  for old in out.glob("train-*.jsonl.gz"):
    old.unlink()
  for s, texts in split.items():
    texts.sort(key=_order)
    parts = ([texts] if s == "validation" else
             [texts[i:i + SHARD_DOCS] for i in range(0, len(texts), SHARD_DOCS)])
    for i, part in enumerate(parts):
      name = "validation.jsonl.gz" if s == "validation" else f"train-{i:03d}.jsonl.gz"
      with gzip.open(out / name, "wt", encoding="utf-8", compresslevel=9) as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in part)
  manifest = {"source": "debian-docs", "packages": versions or {}, "max_doc_chars": MAX_DOC_CHARS,
              "valid_fraction": VALID_FRACTION, "counts": counts,
              "bytes_on_disk": sum(p.stat().st_size for p in out.glob("*.jsonl.gz"))}
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
  return manifest


def unpack_debs(debs: list[pathlib.Path], into: pathlib.Path) -> dict[str, str]:
  """``dpkg-deb -x`` each file into ``into``; returns {package: version}."""
  versions = {}
  for deb in debs:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    name, version = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version"], check=True,
                                   capture_output=True, text=True).stdout.split("\n")[:2]
    versions[name.split(": ", 1)[1]] = version.split(": ", 1)[1]
  return versions


def download(into: pathlib.Path) -> list[pathlib.Path]:
  """``apt-get download`` of ``PACKAGES`` and of what the ``linux-doc`` metapackage
  depends on (its versioned ``linux-doc-<version>``)."""
  def get(names):
    subprocess.run(["apt-get", "download", *names], cwd=into, check=True)

  get(PACKAGES)
  meta = next(into.glob("linux-doc_*.deb"))
  depends = subprocess.run(["dpkg-deb", "-f", str(meta), "Depends"], check=True,
                           capture_output=True, text=True).stdout
  get([d.strip().split(" ")[0] for d in depends.split(",") if d.strip()])
  return sorted(into.glob("*.deb"))


def save_bpe(out: pathlib.Path, vocab_size: int) -> pathlib.Path:
  """The BPE ``--tokenizer bpe`` trains on the corpus in ``out``, saved as
  ``out/bpe-<vocab_size>.json``: a machine the corpus is carried to loads it by path
  instead of training it again (its cache is keyed by the files' mtimes)."""
  from examples.llama.data import sources, tokenizers  # pylint: disable=import-outside-toplevel
  tok = tokenizers.load_tokenizer("bpe", source=sources.resolve_source(f"debian-docs:{out}"),
                                  vocab_size=vocab_size)
  path = out / f"bpe-{vocab_size}.json"
  tok.hf.save(str(path))
  return path


def count_tokens(spec: str, tokenizer: str = "bpe", seq_len: int = 256) -> dict:
  """Tokens of source ``spec`` under ``tokenizer`` (``load_tokenizer``; a bpe is trained on
  the source, 32000 ids), per split: every token with each document's eos (``tokens``, what
  ``--pack`` trains on per epoch) and the targets one epoch of truncated / padded rows of
  ``seq_len`` holds (``targets_truncated``, the papers' protocol)."""
  # pylint: disable-next=import-outside-toplevel
  from examples.llama.data import batches, sources, tokenizers
  src = sources.resolve_source(spec)
  tok = tokenizers.load_tokenizer(tokenizer, source=src)
  out = {"source": spec, "tokenizer": tok.name}
  for split in sources.SPLITS:
    total = truncated = docs = 0
    texts = list(src.documents(split))
    for i in range(0, len(texts), batches.ENCODE_CHUNK):
      for ids in tok.encode_batch(texts[i:i + batches.ENCODE_CHUNK]):
        docs, total, truncated = docs + 1, total + len(ids), truncated + min(len(ids), seq_len) - 1
    out[split] = {"documents": docs, "tokens": total, "targets_truncated": truncated}
  return out


def main(argv=None) -> dict:
  """The command line: prepares the corpus in --out (and its BPE unless --bpe-vocab 0), or with
  --count prints the token counts; returns the manifest or the counts."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(DEBIAN_DOCS_DIR))
  g = p.add_mutually_exclusive_group()
  g.add_argument("--download", action="store_true", help="apt-get download the packages")
  g.add_argument("--debs", type=pathlib.Path, default=None, help="a directory of .deb files")
  p.add_argument("--bpe-vocab", type=int, default=32000,
                 help="also save the byte-level BPE that --tokenizer bpe trains on the corpus,"
                      " as OUT/bpe-VOCAB.json (carry it: --tokenizer OUT/bpe-VOCAB.json); 0: no")
  p.add_argument("--count", default=None, metavar="TOKENIZERS",
                 help="instead: print the token counts (count_tokens) of the corpus in --out"
                      " (or of --data) under these tokenizers, a comma list: bytes,bpe")
  p.add_argument("--data", default=None, help="with --count: another source (e.g. default)")
  args = p.parse_args(argv)
  if args.bpe_vocab != 0 and args.bpe_vocab < MIN_BPE_VOCAB:  # (before the corpus: minutes)
    p.error(f"--bpe-vocab: expected 0 (no BPE) or at least {MIN_BPE_VOCAB} (256 bytes + 3"
            f" specials), got {args.bpe_vocab}")
  names = args.count.split(",") if args.count else []
  if not all(names):
    p.error(f"--count: expected a comma list of tokenizers (bytes,bpe), got {args.count!r}")
  if names:
    spec = args.data or f"debian-docs:{args.out}"
    counts = [count_tokens(spec, t) for t in names]
    print(json.dumps(counts, indent=2))
    return counts
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    if args.download or args.debs:
      debs = download(tmp) if args.download else sorted(args.debs.glob("*.deb"))
      root, versions = tmp / "root", unpack_debs(debs, tmp / "root")
    else:
      root, versions = pathlib.Path("/"), {}
    manifest = prepare(root, args.out, versions)
  print(json.dumps(manifest, indent=2))
  if args.bpe_vocab:
    save_bpe(args.out, args.bpe_vocab)
  print(f"wrote {args.out}: train it with --data debian-docs:{args.out}", file=sys.stderr)
  return manifest


def run(argv=None) -> int:
  """``main`` as a command: an error in the command (a path, the data, a tokenizer) is one
  line on stderr and exit code 2, as argparse's; a failed download or write one line and 1."""
  try:
    main(argv)
  except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as e:
    print(f"debian.py: error: {e}", file=sys.stderr)
    return 2
  except (OSError, subprocess.CalledProcessError) as e:
    print(f"debian.py: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(run())
