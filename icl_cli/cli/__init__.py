"""The command layer: parse options, call one library function, render its result."""
