"""melt command-line interface (thin: parses options, calls one melt_core function, renders)."""
