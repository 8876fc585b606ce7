"""Data: sources -> documents -> cached tokens -> packed sequences -> a resumable mixture."""

from tunelab.data.mixture import Mixture
from tunelab.data.packing import PackedSequences, collate, document_position_ids
from tunelab.data.sources import (Documents, content_hash, iter_documents, read_documents, source_content_hash,
                                  tokenizer_training_texts)
from tunelab.data.split import split_documents
from tunelab.data.tokcache import TokenizedSource, cache_key, tokenize_source, tokenize_sources

__all__ = ["Documents", "Mixture", "PackedSequences", "TokenizedSource", "cache_key", "collate", "content_hash",
           "document_position_ids", "iter_documents", "read_documents", "source_content_hash", "split_documents",
           "tokenize_source", "tokenize_sources", "tokenizer_training_texts"]
