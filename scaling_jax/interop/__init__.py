"""Other frameworks' checkpoints: weight mappings and the run directories written from them."""
