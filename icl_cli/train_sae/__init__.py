"""Training SAEs and transcoders on a model's activations (the library step behind `icl train-sae`)."""
