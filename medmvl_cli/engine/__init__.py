"""Running things: training stages, launch, checkpoints, the run folder, the environment."""
