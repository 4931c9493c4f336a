"""Step 2, ``icl train-sae``: SAEs (``resid_pre``, ``attn_out``) and transcoders (``mlp_in → mlp_out``)
trained on a model's activations streamed from a corpus. Reads a model and text; writes a
SAELens folder (``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors``).

    step.py  the step in one call (run_train_sae);  estimate.py  its memory (--estimate)
"""
