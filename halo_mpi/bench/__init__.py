"""Benchmarks: the modes under loss, single-process decode speed, the loss emulation's fit."""
