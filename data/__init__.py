"""Everything between a folder of photos and identity-balanced training batches."""
