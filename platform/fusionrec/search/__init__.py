"""Ray Tune over training configurations: `fusionrec tune` (tune.py: the search; space.py: its
space; trial.py: one trial; board.py: the leaderboard and the confirmation round) and `fusionrec
ablate` (ablate.py: the paper's Table 1)."""
