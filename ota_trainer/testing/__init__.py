"""Helpers for testing training and merging pipelines offline, shipped on purpose: a loopback
Hub server that the real ``huggingface_hub`` client talks to (:mod:`.local_hub`, standard
library only; ``python -m ota_trainer.testing.local_hub``), tiny random models and experts with
moments (:mod:`.tiny`), and pytest fixtures wiring them up (:mod:`.pytest_fixtures`, which needs
``pip install "ota_trainer[testing]"``, the extra that declares pytest). Nothing else in the
package imports them."""
