"""Model files: the HDF5 neuron-group store (layout, group reads, shards), GGUF -> HDF5, fetching."""
