"""The bottom layer: row columns, Arrow schemas, the run directory's names, operational fields,
atomic writes, plugin registries, progress events. Imports nothing of ours above it."""
