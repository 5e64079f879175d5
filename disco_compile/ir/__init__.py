"""The IR: channel labels and ownership (labels.py) and the records of what the passes decided (plan.py)."""
from .labels import (REPLICATED, ChannelSpace, ChannelUniverse, channel_dims, compress, fits, left_padded, owners,
                     units_per_sample)
from .plan import MixingLayer, PartitionPlan, Placement, ReplicatedOp, StatExchange

__all__ = ["REPLICATED", "ChannelSpace", "ChannelUniverse", "channel_dims", "compress", "fits", "left_padded", "owners",
           "units_per_sample", "MixingLayer", "PartitionPlan", "Placement", "ReplicatedOp", "StatExchange"]
