"""Data pipeline: JSON Lines corpora -> Megatron token shards -> weighted, resumable packed mixture."""
