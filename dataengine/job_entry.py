"""A submitted job's entry point: check that the cluster's Python has our dependencies, then run the CLI.

A job runs `python -m dataengine.job_entry run spec.yaml` with whatever `python` the head's PATH (or
`dataengine submit --python`) names. A head started outside the project's environment has a Python
without pyarrow, torch and the rest; importing the CLI there dies deep in a traceback. This module
imports only the standard library until the check passes, so the job's log ends with one line that
names what is missing and how to fix it.
"""

from __future__ import annotations

import importlib.util
import sys

#: import name of every runtime dependency in pyproject.toml (tests keep the two lists in step)
REQUIRED_MODULES = ("ray", "pyarrow", "polars", "pydantic", "yaml", "numpy", "PIL", "cv2", "urllib3", "torch",
                    "torchvision", "open_clip", "transformers", "safetensors", "faiss", "onnxruntime", "openai",
                    "aiohttp", "peft", "jinja2")


def missing_modules() -> list[str]:
    """The required modules this interpreter cannot import."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def missing_message(missing: list[str]) -> str:
    return (f"error: the cluster's Python ({sys.executable}, {sys.version.split()[0]}) lacks dataengine's "
            f"dependencies ({', '.join(missing)}): install them into the Python that runs jobs on every node "
            "(`pip install <this checkout>` or the images in docker/), start `ray start` with that Python's bin "
            "directory first on PATH, or submit with `--python /path/to/that/python`")


def main(argv: list[str] | None = None) -> int:
    missing = missing_modules()
    if missing:
        print(missing_message(missing), file=sys.stderr, flush=True)
        return 2
    from dataengine.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
