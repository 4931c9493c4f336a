"""Step 4, ``icl steer``: add or subtract feature directions at the arrow (executors) or at a dummy
example's output (detectors) and measure the loss change: task × feature heatmaps, the executor and
detector rule, negative steering. Reads clean artifacts and SAEs; writes ``steer.h5``.

    heatmaps.py  the computation;  artifact.py  steer.h5;  view.py  terminal heatmap;  explore.py  greedy completions
    step.py  the steps in one call each (run_steer, run_explore)
"""
