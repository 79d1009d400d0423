"""Tensor-parallel HALO mode: sync policy, coordinator (rank 0), worker, placement, importance,
predictor and calibration."""
