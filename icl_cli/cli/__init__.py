"""The command layer: one small module per subcommand that parses options, calls one library
function and renders its result (tables on stdout, progress and one-line errors on stderr)."""
