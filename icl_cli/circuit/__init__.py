"""Step 6, ``icl circuit``: sparse feature circuits on ICL prompts (SPEC §7). The model runs with
every dictionary site spliced in as reconstruction + error; node and edge effects by attribution
patching, aggregated by token role; node selection and faithfulness. Reads a model and a
dictionary suite; writes ``circuit.h5`` (plus graph.json / DOT exports).

    step.py  the step in one call (run_circuit, estimate_circuit);  faithfulness_step.py  run_faithfulness
"""
