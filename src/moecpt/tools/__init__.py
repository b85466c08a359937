"""Operations around training for continual pre-training: upcycling a dense model to MoE, merging
checkpoints, and vocabulary expansion (docs/cpt.md)."""
