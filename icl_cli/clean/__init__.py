"""Step 3, ``icl clean``: task vector cleaning, a sparse SAE decomposition of a task (or detector)
vector that keeps the task, with the raw vector, the SAE reconstruction and gradient pursuit as
baselines. Reads a collect artifact and an SAE; writes ``clean.h5``.

    cleaning.py  the optimisation;  pursuit.py  gradient pursuit;  artifact.py  parameters and HDF5 (no torch)
    step.py  the step in one call (run_clean);  estimate.py  its memory (--estimate)
"""
