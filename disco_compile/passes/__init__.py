"""Graph passes, one per module: channel_flow (analysis), partition, insert_exchanges."""
