"""The circuit viewer: a page (static/) that draws circuit graphs in circuit-tracer's
attribution-graph JSON with vendored d3 and dagre, and the local server of ``icl circuit serve``
(serve.py)."""
