"""Text, tokenizers and batches for the LLaMA example.

The papers' protocol (reference/galore.md 2.2): C4 "en", the ``t5-base`` tokenizer,
every document tokenized and truncated or right-padded to 256 tokens (pad masked
out of the loss, no packing), the train split shuffled with a seed, and evaluation
on a fixed budget of non-pad tokens from the validation split.

  sources.py     ``Source`` and ``resolve_source``: the embedded default corpus, C4,
                 Hugging Face datasets, local text / JSON files (``SOURCE_HELP``).
  tokenizers.py  ``Tokenizer`` and ``load_tokenizer``: bytes, t5-base, a trained BPE, a
                 saved tokenizer (``TOKENIZER_HELP``).
  batches.py     ``Batches`` (shuffled, resumable training batches), ``eval_batches``,
                 ``Prefetch`` (batches made in a background thread).

The names below are the ones the training script and the tests use; the rest is in
the modules.
"""

from examples.llama.data.batches import Batches, Prefetch, eval_batches
from examples.llama.data.sources import SOURCE_HELP, resolve_source
from examples.llama.data.tokenizers import (MIN_BPE_VOCAB, SIZED_TOKENIZERS, TOKENIZER_HELP,
                                             auto_spec, load_tokenizer)

__all__ = ["MIN_BPE_VOCAB", "SIZED_TOKENIZERS", "SOURCE_HELP", "TOKENIZER_HELP", "Batches",
           "Prefetch", "auto_spec", "eval_batches", "load_tokenizer", "resolve_source"]
