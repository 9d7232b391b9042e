"""The command line: parse, call the core, render. Nothing here is imported by the core."""
