"""Everything that imports Ray: the trainable around the Trainer, the launcher, and PBT's scheduler
with its explore and truncation rules."""
