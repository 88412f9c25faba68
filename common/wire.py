"""Every key that crosses the network, in one place (see DESIGN.md, wire protocol).

Server -> client: ``arrays`` (the trainable part: the head, and the backbone's tail when the cut
is later), ``config`` (instructions), and ``backbone`` (the frozen weights, or the ONNX model of
the node's engine and cut) only for a node that does not hold that variant yet. A ``query`` asks
a node which engine it runs and which variant it holds, or (FedNCM) for its class statistics.
Client -> server: ``arrays`` (the trainable part only, after train), ``metrics`` (numbers only,
with ``num-examples``) and ``status`` (fingerprint it used, notes on its data); to the FedNCM
query, ``class-stats``: per-class sums of pooled features over at least ``ncm-min-examples``
images, and counts. Never images, never embeddings, never anything per sample.
"""

from __future__ import annotations

# Record names inside a message's RecordDict
ARRAYS = "arrays"
CONFIG = "config"
BACKBONE = "backbone"
METRICS = "metrics"
STATUS = "status"

# Query actions (message type "query")
QUERY_ACTION = "action"
ACTION_BACKBONE_STATUS = "backbone-status"
ACTION_CLASS_SUMS = "class-sums"  # FedNCM: carries a train message's content, answered with CLASS_STATS

# The FedNCM reply's record: per class, the sum of pooled normalised features and the count
CLASS_STATS = "class-stats"
CLASS_SUMS = "sums"
CLASS_COUNTS = "counts"

# Instruction keys in CONFIG (server -> client)
SERVER_ROUND = "server-round"  # injected by Flower's strategies
FINGERPRINT = "backbone-fingerprint"
BACKBONE_NAME = "backbone-name"
PREPROCESS = "preprocess"  # PreprocessSpec as canonical JSON
ENGINE = "engine"  # the engine this node runs (per node; also in query and reply STATUS)
ENGINE_FINGERPRINT = "engine-fingerprint"  # that engine's variant of the backbone (per node)
HEAD = "head"
MLP_HIDDEN = "mlp-hidden"
CUT = "cut"  # backbone stages after the cut, trained with the head
VIEWS = "views"  # comma list of the views embedded and trained on (common/views.py)
AVERAGE_VIEWS = "average-views"  # evaluate on the mean prediction over the views
PERSONAL_EPOCHS = "personal-epochs"  # > 0: fine-tune and score a personal head at evaluation
NCM_MIN_EXAMPLES = "ncm-min-examples"
NUM_CLASSES = "num-classes"
LOCAL_EPOCHS = "local-epochs"
LEARNING_RATE = "learning-rate"
WEIGHT_DECAY = "weight-decay"
BATCH_SIZE = "batch-size"
PROXIMAL_MU = "proximal-mu"  # also the key Flower's FedProx injects
SEED = "seed"

# Reply keys in METRICS (client -> server); all numbers
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
TRAIN_SECONDS = "train-seconds"
EMBED_SECONDS = "embed-seconds"
EMBEDDINGS_COMPUTED = "embeddings-computed"
EMBEDDINGS_CACHED = "embeddings-cached"
IMAGES_SKIPPED = "images-skipped"
CLASSES_MISSING = "classes-missing"  # run classes with no local image (names go in STATUS data-notes)
BACKBONE_RECEIVED = "backbone-received"
LOSS = "loss"
ACCURACY = "accuracy"
MACRO_F1 = "macro-f1"
PERSONAL_ACCURACY = "personal-accuracy"  # the personal head on the same local test share
PERSONAL_MACRO_F1 = "personal-macro-f1"
PEAK_RSS_MB = "peak-rss-mb"  # device telemetry: the ClientApp process's memory high-water mark
CPU_TEMP_C = "cpu-temp-c"  # device telemetry, only where the board exposes a CPU thermal zone

# Reply keys in STATUS (client -> server); short strings about the node, not its data
DATA_NOTES = "data-notes"
HELD_FINGERPRINT = "held-fingerprint"  # query reply: variant held for ENGINE ("" if none)

# The backbone record of an ONNX engine holds the model file's bytes under this name
ONNX_MODEL = "model.onnx"
