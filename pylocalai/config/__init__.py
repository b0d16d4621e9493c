"""LocalAI model configuration and prompt templating (pure Python, no engine imports)."""
