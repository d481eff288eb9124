"""Near-duplicate search: image descriptors (SSCD, pHash) and the FAISS index that groups them."""
