"""Temporal modelling: pooling frames into segment embeddings (``pooling``), localisation (``localize``), contrastive
losses and the training loop (``losses``, ``train``), head checkpoints (``checkpoint``), metrics, atomic file writes
(``files``). Import the module you need: ``localize`` and ``files`` load no torch, which the decode workers use."""
