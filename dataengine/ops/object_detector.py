"""`object_detector_mapper`: boxes for web images, which come without annotations.

A transformers object detector writes `boxes` in the form synthesis reads (`[{"label", "box": [x1, y1,
x2, y2] normalised to [0, 1], "score"}]`, best first): zero-shot with a label list (`labels`: the OWLv2
and Grounding DINO families, `AutoModelForZeroShotObjectDetection`), or a closed-vocabulary model's own
classes (the DETR family, `AutoModelForObjectDetection`, `labels: null`). Rows that already have boxes
(an annotated input's `boxes_col`) keep them unless `overwrite`. A row with no detection above
`threshold` gets `[]`: synthesis then works from its captions alone.
"""

from __future__ import annotations

import io
import json
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from dataengine.core import columns as C
from dataengine.models.devices import select_device, select_dtype
from dataengine.models.sources import from_local_or_hub
from dataengine.ops.base import ModelOp, ModelOpConfig, register_op


class ObjectDetectorConfig(ModelOpConfig):
    """Detector settings."""

    op: Literal["object_detector_mapper"] = "object_detector_mapper"
    model: str = Field(default="google/owlv2-base-patch16-ensemble",
                       description="Hub id or local directory: a zero-shot detector (OWLv2, Grounding DINO) with "
                                   "`labels`, or a closed-vocabulary one (DETR family) without.")
    labels: list[str] | None = Field(default=None, min_length=1,
                                     description="What to look for (zero-shot); null: the model's own classes.")
    threshold: float = Field(default=0.3, ge=0, le=1, description="Keep detections scoring at least this.")
    text_threshold: float = Field(default=0.25, ge=0, le=1,
                                  description="Grounding DINO: a label's words must score this to name a box.")
    max_objects: int = Field(default=20, gt=0, description="Most boxes kept per image, best first.")
    overwrite: bool = Field(default=False, description="Replace boxes a row already has (an annotated input).")
    batch_size: int = Field(default=8, gt=0, description="Images per batch.")


@register_op
class ObjectDetectorMapper(ModelOp[ObjectDetectorConfig]):
    """Detect objects; write `boxes` JSON for synthesis."""

    Config = ObjectDetectorConfig

    def load_model(self, config: ObjectDetectorConfig) -> Any:
        import transformers

        device = select_device(config.device)
        dtype = select_dtype(config.dtype, device)
        model_class = transformers.AutoModelForZeroShotObjectDetection if config.labels \
            else transformers.AutoModelForObjectDetection
        model, self.processor = from_local_or_hub(config.model, lambda source, local_only: (
            model_class.from_pretrained(source, local_files_only=local_only, dtype=dtype),
            transformers.AutoProcessor.from_pretrained(source, local_files_only=local_only)), "object detector")
        # OWLv2 pads each image to a square before resizing: its boxes are relative to that square
        self.square = model.config.model_type == "owlv2"
        return model.to(device).eval()

    def process(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        config = self.config
        n = batch.num_rows
        images = batch.column(C.IMAGE).to_pylist() if C.IMAGE in batch.column_names else [None] * n
        existing = batch.column(C.BOXES).to_pylist() if C.BOXES in batch.column_names else [None] * n
        boxes: list[str | None] = list(existing)
        reasons: list[str | None] = [None] * n
        pils, rows = [], []
        for i, image in enumerate(images):
            if existing[i] and not config.overwrite:
                continue
            if image is None:
                reasons[i] = "no_image"
                continue
            try:
                pils.append(Image.open(io.BytesIO(image)).convert("RGB"))
                rows.append(i)
            except (OSError, ValueError):
                reasons[i] = "decode_error"
        if pils:
            for i, found in zip(rows, self.detect(pils)):
                boxes[i] = json.dumps(found)
        return pa.table({C.BOXES: pa.array(boxes, pa.string()), C.REJECT_REASON: pa.array(reasons, pa.string())})

    def detect(self, images: list[Any]) -> list[list[dict[str, Any]]]:
        """Each image's detections above the threshold, best first: label, box normalised to [0, 1], score."""
        config, torch = self.config, self.torch
        labels = config.labels
        if labels:
            inputs = self.processor(text=[labels] * len(images), images=images, return_tensors="pt")
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        sizes = [(max(im.height, im.width),) * 2 if self.square else (im.height, im.width) for im in images]
        with torch.inference_mode():
            outputs = self.model(**inputs)
        if labels and self.model.config.model_type == "grounding-dino":
            results = self.processor.post_process_grounded_object_detection(
                outputs, threshold=config.threshold, text_threshold=config.text_threshold, target_sizes=sizes)
        elif labels:
            results = self.processor.post_process_grounded_object_detection(
                outputs, threshold=config.threshold, target_sizes=sizes, text_labels=[labels] * len(images))
        else:
            results = self.processor.post_process_object_detection(outputs, threshold=config.threshold,
                                                                    target_sizes=sizes)
        names = self.model.config.id2label
        out = []
        for image, result in zip(images, results):
            width, height = image.width, image.height
            found = []
            texts = result["text_labels"] if labels else None  # OWLv2: our labels; Grounding DINO: the words it matched
            for k, (score, box) in enumerate(zip(result["scores"].tolist(), result["boxes"].tolist())):
                x1, y1, x2, y2 = box
                normalised = [round(min(max(v, 0.0), 1.0), 4) for v in (x1 / width, y1 / height, x2 / width, y2 / height)]
                if normalised[2] <= normalised[0] or normalised[3] <= normalised[1]:
                    continue  # nothing left inside the image
                if texts is not None:
                    name = label_named(texts[k], labels or [])
                    if name is None:
                        continue  # words that name none of the labels: no box we can name
                else:
                    label = int(result["labels"][k])
                    name = names.get(label, str(label))
                found.append({"label": name, "box": normalised, "score": round(float(score), 4)})
            found.sort(key=lambda d: -d["score"])
            out.append(found[:config.max_objects])
        return out


def label_named(words: str, labels: list[str]) -> str | None:
    """The label a detection's matched words name: the words themselves, or the label they mention first
    (Grounding DINO returns the prompt's words above the text threshold, e.g. "red circle" or "circle.
    star."); None when they name none."""
    text = words.strip().lower().rstrip(".")
    for label in labels:
        if text == label.lower():
            return label
    mentioned = [(text.find(label.lower()), i) for i, label in enumerate(labels) if label.lower() in text]
    return labels[min(mentioned)[1]] if mentioned else None
