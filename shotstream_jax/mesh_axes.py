"""The device mesh's axis names: one definition for the training shardings
(training/sharding.py) and for the kernels that must be told how they are split
(models/attention.py: a Mosaic kernel cannot be partitioned by XLA)."""

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')   # the batch (examples, stories) is split over these
HEADS_AXIS = 'tensor'           # attention heads (and FFN columns) over this
