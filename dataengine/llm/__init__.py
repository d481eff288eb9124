"""Instruction synthesis: prompts and fencing, reply parsing and validation, grounding, reply cache,
usage and budget, trainer readiness, and the backends that write samples (`backends/`: openai, vllm,
template, behind one `generate()`)."""
