"""Training pipeline: stage 1 backbone, 2 dynamics, 3 value heads, 4 assembly; corpus and tasks."""
