"""Built-in CLI commands, one module per command family, loaded on demand."""
