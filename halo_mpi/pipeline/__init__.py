"""Pipeline mode (MDI-LLM): contiguous blocks of layers on a ring, several sequences in flight."""
