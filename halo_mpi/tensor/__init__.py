"""Tensor-parallel HALO mode: the plan (roles, placement), the members' all-reduce, rank 0's lead
of the satellites under deadlines, re-planning, importance and its predictor."""
