"""Local lm-eval task definitions (YAML + data), found with lm_eval's TaskManager(include_path=...)."""
