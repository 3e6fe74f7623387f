"""Moments: the on-disk format of Adam's second moments (v1, :mod:`.format`) and their rank-one
compression (:mod:`.compress`)."""
