"""Model operations: model(s) in, model out, no training loop (see ARCHITECTURE.md, "Where things go")."""
