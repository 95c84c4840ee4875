"""Data: corpora (the embedded standard-library corpus, text/JSONL/Parquet files), token
shards, and tokenizers/shards made on demand and cached by content."""

from llmcore.data.corpus import Document, iter_documents, manifest, stdlib_files
from llmcore.data.shards import TokenShards, prepare_shards, read_header

__all__ = ["Document", "TokenShards", "iter_documents", "manifest", "prepare_shards",
           "read_header", "stdlib_files"]
