"""Step 1, ``icl collect``: task vectors (mean ``resid_pre`` at the arrows of few-shot prompts),
detector vectors (at the outputs), the layer sweep that scores them, and max-activating contexts.
Reads a model and its tasks (plus SAEs for activation mass); writes ``collect.h5`` / ``top_activations.h5``.

    vectors.py         the computation;  artifact.py   its parameters and HDF5 (no torch)
    top_activations.py max-activating contexts of features
    step.py            the steps in one call each (run_collect, run_top_activations)
"""
