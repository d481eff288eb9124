"""The test bed: the synthetic web (generated image-text pairs with labelled noise, served on
127.0.0.1), its fake OpenAI-compatible LLM server, the demo's tiny-model trainers, the synthetic-web
VQA benchmark and `dataengine demo`.

It sits above the engine: it imports the engine and plugs into it through entry points
(`dataengine.core.plugins`): the `synthweb-demo:` model source, the `synthweb` benchmark, the report's
ground-truth section and the `synthweb`, `demo-models` and `demo` commands. The engine never imports
it (tests/test_architecture.py).
"""
