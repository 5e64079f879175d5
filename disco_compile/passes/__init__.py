"""Graph passes, one per module: expand_attention and expand_window_attention (attention as ops split by heads),
raise_attention (the same for torch.export programs), channel_flow (the analysis), partition, insert_exchanges."""
