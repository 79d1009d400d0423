"""The single-process LLaMA and what it needs: hyperparameters, weight layouts, neuron groups,
tokenizer, sampling and the generation loop. No MPI here: every distributed mode is tested
against this model."""
