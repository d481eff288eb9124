"""The synthetic web: generated image-text pairs with labelled noise, and a local server for them.

Because every image is drawn from a known scene and every defect is injected on purpose, a pipeline run
against it can be scored exactly: which rows a downloader or filter should have dropped, and why.
"""

from dataengine.testbed.synthweb.build import (
    EXPECTED_REASON,
    ROUTES,
    TRUTH_SCHEMA,
    NoiseMix,
    build_synthweb,
    item_id,
    write_url_list,
)
from dataengine.testbed.synthweb.render import DUP_TRANSFORMS, encode_jpeg, render_scene, transform_image
from dataengine.testbed.synthweb.scenes import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    POSITIONS,
    SIZES,
    Scene,
    SceneObject,
    caption_scene,
    generate_scene,
)
from dataengine.testbed.synthweb.server import SynthWebServer, bomb_png

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DUP_TRANSFORMS",
    "EXPECTED_REASON",
    "KINDS",
    "POSITIONS",
    "ROUTES",
    "SIZES",
    "TRUTH_SCHEMA",
    "NoiseMix",
    "Scene",
    "SceneObject",
    "SynthWebServer",
    "bomb_png",
    "build_synthweb",
    "caption_scene",
    "encode_jpeg",
    "generate_scene",
    "item_id",
    "render_scene",
    "transform_image",
    "write_url_list",
]
