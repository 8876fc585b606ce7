"""Data: sources -> documents -> cached tokens -> packed sequences -> a resumable mixture."""

from tunelab.data.mixture import Mixture
from tunelab.data.packing import PackedSequences, collate, document_position_ids
from tunelab.data.sources import Documents, read_documents, tokenizer_training_texts
from tunelab.data.tokcache import TokenizedSource, split_documents, tokenize_source, tokenize_sources

__all__ = ["Documents", "Mixture", "PackedSequences", "TokenizedSource", "collate", "document_position_ids",
           "read_documents", "split_documents", "tokenize_source", "tokenize_sources", "tokenizer_training_texts"]
