"""The PyTorch backend: FFG saliencies and histograms (:mod:`.ffg`) and shared tensor helpers (:mod:`.ops`)."""
