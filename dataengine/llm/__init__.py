"""LLM-side pieces of instruction synthesis: output validation (more to come with issue 4)."""
