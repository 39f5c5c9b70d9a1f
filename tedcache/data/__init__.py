"""Data in, tokenized examples out: reading files (files), label sets (labels), one tokenizer per task
(tokenize; question answering's windows in questions), the flat examples record (examples) and its
content hash (fingerprint)."""

from .examples import IGNORED, UNTAGGED, Examples, TokenSpool, concatenate
from .files import load_table
from .tokenize import load_blocks, load_examples

__all__ = ["IGNORED", "UNTAGGED", "Examples", "TokenSpool", "concatenate", "load_blocks", "load_examples", "load_table"]
