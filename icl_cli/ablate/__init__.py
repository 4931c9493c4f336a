"""Step 5, ``icl ablate``: ablate feature sets at token roles (own task and cross-task), the
activation mass of features by role, and the detector → executor link. Reads steer / clean
artifacts and SAEs; writes ``ablate.h5``, ``mass.h5``, ``link.h5``.

    feature_ablation.py  ablation and the cross-task matrix;  feature_sets.py  which features;
    mass.py  activation mass by role;  link.py  detector → executor;  view.py  terminal heatmaps
    step.py  the steps in one call each (run_ablate, run_mass, run_link)
"""
