"""`halo-mpi serve`: an OpenAI-compatible HTTP API on rank 0 (api.py), jobs handed from the server
thread to the rank driving the model (broker.py), and the loop that runs them (driver.py)."""
