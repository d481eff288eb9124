"""Column names: the one place they are spelled, matched by the schemas in `schemas/`."""

# identity and source
UID = "uid"  # our stable row id: "<input file index>-<row index>", unique per run
SOURCE_ID = "source_id"  # the user's id column, when the spec names one
URL = "url"
CAPTION = "caption"
BOXES = "boxes"  # JSON list of {label, box [x1, y1, x2, y2] in [0, 1], attributes}, when the input has them

# written by the download stage
IMAGE = "image"  # encoded bytes after resize/re-encode
IMAGE_FORMAT = "image_format"  # "jpeg" | "webp" | "png"
WIDTH = "width"
HEIGHT = "height"
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
ORIGINAL_BYTES = "original_bytes"  # size of the body as served, in bytes
SHA256 = "sha256"  # of the original bytes as served
FINAL_URL = "final_url"  # after redirects
HTTP_STATUS = "http_status"
DOWNLOAD_ATTEMPTS = "download_attempts"
DOWNLOAD_ERROR = "download_error"  # human-readable detail behind a download reject reason

# written by filters
CLIP_SCORE = "clip_score"  # cosine similarity of CLIP image and caption embeddings
CLIP_IMAGE_EMBEDDING = "clip_image_embedding"  # L2-normalised, when clip_score_filter is asked to keep it
TEXT_PPL = "text_ppl"  # caption perplexity under a causal LM
SSCD_EMBEDDING = "sscd_embedding"  # dedup descriptor: L2-normalised SSCD copy-detection embedding
PHASH = "phash"  # dedup descriptor: perceptual hash bits, packed bytes (then the colour layout, with colour_tolerance)
DEDUP_THUMBNAIL = "dedup_thumbnail"  # dedup with crops: a 64-px RGB thumbnail (2 header bytes h, w, then pixels)
METACLIP_ENTRIES = "metaclip_entries"  # metaclip_balance: the entries a caption matched

# written by CapFilt (blip_caption_mapper, capfilt_filter)
SYNTHETIC_CAPTIONS = "synthetic_captions"
VLM_CAPTION = "vlm_caption"
WEB_CAPTION_ITM = "web_caption_itm"
SYNTHETIC_CAPTION_ITM = "synthetic_caption_itm"
CAPTIONS_KEPT = "captions_kept"  # best first
CAPTION_BEST = "caption_best"
CAPTION_BEST_SOURCE = "caption_best_source"  # "web" | "synthetic"

# written by llava_synthesis_mapper and export
INSTRUCTION_TYPE = "instruction_type"
CONVERSATIONS = "conversations"  # LLaVA turns as JSON text
LLM_MODEL = "llm_model"
LLM_PROMPT_TOKENS = "llm_prompt_tokens"
LLM_COMPLETION_TOKENS = "llm_completion_tokens"
LLM_COST_USD = "llm_cost_usd"
LLM_CACHED = "llm_cached"
LLM_RAW_RESPONSE = "llm_raw_response"
UNGROUNDED_OBJECTS = "ungrounded_objects"
CONVERSATION_TOKENS = "conversation_tokens"

# routing: set by a stage for the rows it rejects
REJECT_STAGE = "reject_stage"
REJECT_REASON = "reject_reason"

# internal, never written to dataset/ or rejected/
INTERNAL_PREFIX = "_"
SHARD = "_shard"
TALLY = "_tally"  # in the stream only: a row standing for this many rows a stage rejected (null on real rows)
STAGE_SECONDS_PREFIX = "_seconds_"  # + stage index: per-row share of a batch's wall time
STAGE_BATCHES_PREFIX = "_batches_"  # + stage index: per-row share of one model batch (sums to the batches)
STAGE_COUNTERS = {"seconds": STAGE_SECONDS_PREFIX, "batches": STAGE_BATCHES_PREFIX}
PREPARED_PREFIX = "_prepared_"  # + name: a model stage's CPU half's arrays (pixels, token ids) for its actor
LLM_REQUEST = "_llm_messages"  # vllm backend: chat messages (JSON) from the prepare phase
LLM_REPLY_TEXT = "_llm_text"  # vllm backend: what Ray Data LLM generated, and its accounting
LLM_REPLY_FINISH = "_llm_finish"
LLM_REPLY_PROMPT_TOKENS = "_llm_prompt_tokens"
LLM_REPLY_COMPLETION_TOKENS = "_llm_completion_tokens"

# training samples (tokenized rows inside the trainer's Ray Data pipeline, never written to a run)
INPUT_IDS = "input_ids"
LABELS = "labels"  # input ids on assistant tokens, -100 elsewhere
PIXEL_VALUES = "pixel_values"  # the processor's image tensor, flattened float32
SAMPLE_LENGTH = "length"  # tokens, image tokens included
SKIP = "skip"  # why a row does not train (bad_image, no_sample, too_long), null when it does

#: columns a run reads from the input, before any stage
INPUT_COLUMNS = (UID, SOURCE_ID, URL, CAPTION, BOXES)

# a training mixture's rows file (`dataengine mix`): which source a row comes from, and how many times it trains
MIXTURE_SOURCE = "source"
MIXTURE_REPEATS = "repeats"
