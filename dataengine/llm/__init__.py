"""Instruction synthesis: prompts and fencing, reply parsing and validation, grounding, templates, the
openai and vllm backends, reply cache, usage and budget, and trainer readiness."""
