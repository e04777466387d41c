"""What a user does with a trained run: evaluate, explain, export, serve, tune."""
