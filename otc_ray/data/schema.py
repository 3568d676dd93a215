"""Column names of every batch that flows between stages (`dict[str, np.ndarray]`), and the skip reasons.

Reader rows (one per sample, good or bad):
    KEY          str     sample key, unique within a shard set ("000012345")
    IMAGE_BYTES  bytes   encoded image as stored (png / jpg / webp); b"" when missing
    IMAGE_EXT    str     extension of the stored image ("png", "jpg", ...)
    CAPTION_RAW  bytes   caption bytes as stored (UTF-8 is checked by the decoder)
    META         str     JSON metadata ("{}" when absent)
    SOURCE       str     shard path the sample came from
    ERROR        str     "" for a good sample, else one of SKIP_REASONS
Decoded rows add:
    CAPTION      str     validated caption
    IMAGE        uint8   (H, W, 3) image resized to the configured size
    LABEL        int64   class index from the metadata, -1 when unknown
"""
from __future__ import annotations

KEY = "key"
IMAGE_BYTES = "image_bytes"
IMAGE_EXT = "image_ext"
CAPTION_RAW = "caption_raw"
CAPTION = "caption"
META = "meta"
SOURCE = "source"
ERROR = "error"
IMAGE = "image"
LABEL = "label"

READER_COLUMNS = (KEY, IMAGE_BYTES, IMAGE_EXT, CAPTION_RAW, META, SOURCE, ERROR)
DECODED_COLUMNS = (KEY, IMAGE, CAPTION, LABEL, IMAGE_BYTES, IMAGE_EXT, META, SOURCE, ERROR)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt",)
META_EXTENSIONS = ("json",)

# Skip reasons: every sample that is not used is counted under exactly one of these.
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
BAD_UTF8 = "bad_utf8"
CAPTION_TOO_LONG = "caption_too_long"
UNSAFE_PATH = "unsafe_path"
DUPLICATE_KEY = "duplicate_key"
TRUNCATED_SHARD = "truncated_shard"
CORRUPT_SHARD = "corrupt_shard"
BAD_META = "bad_meta"

SKIP_REASONS = (CORRUPT_IMAGE, IMAGE_TOO_LARGE, MISSING_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, BAD_UTF8,
                CAPTION_TOO_LONG, UNSAFE_PATH, DUPLICATE_KEY, TRUNCATED_SHARD, CORRUPT_SHARD, BAD_META)
