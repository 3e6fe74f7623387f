"""Backends that compute a merge: native kernels on raw addresses (:mod:`.native`) and PyTorch (:mod:`.torch`)."""
