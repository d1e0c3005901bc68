"""Data: offline long-document corpora (:mod:`.corpora`), tokenising and packing (:mod:`.packing`),
instruction data and chat templates (:mod:`.instruct`), synthetic long-context tasks (:mod:`.tasks`)
and instruction mixtures (:mod:`.mix`). Only the light corpus API is imported here."""

from sinklora.data.corpora import Document, known_sources, load_documents

__all__ = ["Document", "known_sources", "load_documents"]
