"""Model galleries as LocalAI has them: indexes of installable models, and jobs that install or delete."""
