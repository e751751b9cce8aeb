"""What a user would write instead of oel_ray, for the side-by-side consolidation benchmark: TRL's
GKDTrainer (on-policy reverse KL) and a plain single-process PyTorch loop. Both do the work that
`Work` describes, the same work oel_ray's consolidation step does."""
