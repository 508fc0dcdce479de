"""Command-line entry points: thin wrappers that parse flags, build objects and call the library."""
