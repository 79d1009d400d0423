"""The cluster and its links: framing, the MPI transport and its in-process twin, loss emulation,
link estimates, device profiles, rank options, launch and abort. Torch-free."""
