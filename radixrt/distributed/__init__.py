"""Tensor parallelism: process groups (group.py), the rank-0 step broadcast and the follower loop
(plan.py, follower.py), and engine construction across ranks (launch.py)."""
