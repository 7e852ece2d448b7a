"""The expert-parallel data plane: expert-shard actors, the router, and the all-to-all between them."""
