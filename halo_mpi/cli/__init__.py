"""The `halo-mpi` command line (entry point: halo_mpi.cli.main:main). Nothing imports it."""
