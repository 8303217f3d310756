"""Layer 1, the math: bridge times and marginals, the mapping g and its tail, the SDE's spline,
precision handling, input validation and seeded construction. Imports nothing else of sbpet;
every layer above builds on it."""
