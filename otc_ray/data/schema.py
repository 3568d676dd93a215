"""Column names of every batch that flows between stages (`dict[str, np.ndarray]`), and the skip reasons.

Reader rows (one per sample, good or bad):
    KEY          str     sample key, unique within a shard set ("000012345")
    IMAGE_BYTES  bytes   encoded image as stored (png / jpg / webp); b"" when missing
    IMAGE_EXT    str     extension of the stored image ("png", "jpg", ...)
    CAPTION_RAW  bytes   caption bytes as stored (UTF-8 is checked by the decoder)
    META         str     JSON metadata ("{}" when absent)
    SOURCE       str     shard path the sample came from
    ERROR        str     "" for a good sample, else one of SKIP_REASONS
    ROW          int64   the row's index in its file: (SOURCE, ROW) names every row, duplicate keys included
Decoded rows add:
    CAPTION      str     validated caption
    IMAGE        uint8   (H, W, 3) image resized to the configured size
    LABEL        int64   class index from the metadata, -1 when unknown
Re-matched rows (otc_ray.rematch stage) add OUTPUT_COLUMNS:
    CAPTION_USED     str      the caption the sample trains with (its own, or the one it was re-matched to)
    RECAPTIONED      bool     CAPTION_USED comes from another sample
    SOURCE_KEY       str      key of the sample CAPTION_USED came from (its own key when unchanged)
    SOURCE_LABEL     int64    class label of that sample (-1 = unknown)
    OWN_SCORE, BEST_SCORE, SUSPICION, GATE_Z
                     float32  own caption's score, best candidate's score, best - own, the gate's z (NaN = unscored)
    FLAGGED          bool     flagged: the gate's verdict now, or a sticky flag from an earlier epoch
    GATE_FLAGGED     bool     the gate's own verdict on this pass (a new flag when FLAGGED was not set before)
    SCREENED         bool     the row went through an active matcher (False: passed through unscored)
    GROUP_SIZE       int64    rows of the pool in the sample's duplicate group (1 = none; 0 = unscreened)
    WEIGHT           float32  loss weight (0 = dropped; 1/GROUP_SIZE for copies under gate evidence)
    WEIGHTS_VERSION  int64    version of the published weights that scored the row (0 = none)
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
ROW = "row"
LABEL = "label"

READER_COLUMNS = (KEY, IMAGE_BYTES, IMAGE_EXT, CAPTION_RAW, META, SOURCE, ERROR)
DECODED_COLUMNS = (KEY, IMAGE, CAPTION, LABEL, IMAGE_BYTES, IMAGE_EXT, META, SOURCE, ERROR)

# columns the re-match stage adds (otc_ray.rematch.stage)
CAPTION_USED = "caption_used"
RECAPTIONED = "recaptioned"
SOURCE_KEY = "source_key"
OWN_SCORE = "own_score"
BEST_SCORE = "best_score"
SUSPICION = "suspicion"
GATE_Z = "gate_z"
FLAGGED = "flagged"
WEIGHT = "weight"
SOURCE_LABEL = "source_label"
WEIGHTS_VERSION = "weights_version"
GATE_FLAGGED = "gate_flagged"
SCREENED = "screened"
GROUP_SIZE = "group_size"
OUTPUT_COLUMNS = (CAPTION_USED, RECAPTIONED, SOURCE_KEY, SOURCE_LABEL, OWN_SCORE, BEST_SCORE, SUSPICION, GATE_Z,
                  FLAGGED, GATE_FLAGGED, SCREENED, GROUP_SIZE, WEIGHT, WEIGHTS_VERSION)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp")
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
BAD_META = "bad_meta"                   # not a JSON object, nested too deep, or a label outside int64
WRONG_TYPE = "wrong_type"               # a parquet column of the wrong type (an int caption, a list image)
DECODE_ERROR = "decode_error"           # any other exception while reading or decoding this one sample
UNREADABLE_FILE = "unreadable_file"     # a whole file that could not be opened or read: marker `{file}#unreadable`

SKIP_REASONS = (CORRUPT_IMAGE, IMAGE_TOO_LARGE, MISSING_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, BAD_UTF8,
                CAPTION_TOO_LONG, UNSAFE_PATH, DUPLICATE_KEY, TRUNCATED_SHARD, CORRUPT_SHARD, BAD_META, WRONG_TYPE,
                DECODE_ERROR, UNREADABLE_FILE)
