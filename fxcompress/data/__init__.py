"""Real data that ships inside installable packages (no downloads at run time)."""
from .text import CORPORA, corpus_documents, encode_corpus, load_corpus, split_ids, token_batches, token_windows

__all__ = ["CORPORA", "corpus_documents", "encode_corpus", "load_corpus", "split_ids", "token_batches",
           "token_windows"]
