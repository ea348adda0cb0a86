"""What one `ptpipe serve` request may ask for, and how long it may take: each default once, here,
with its reason (the CLI's flags and docs/serving.md read them from this class). Standard library
only, so `ptpipe --help` does not import the server."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 2**20    # a batch of phone photos; more is refused (413) before it is read
    # A JSON tensor body: a 64-image UINT8 batch is 0.86 MiB as JSON. Parsing holds the GIL (json and
    # numpy are C), ~20 ms a MiB on this VM, so 2 MiB keeps health answers under ~50 ms; bigger tensors
    # go binary (the binary tensor extension costs no parsing).
    max_json_bytes: int = 2 * 2**20
    # Values in one JSON output tensor (~20 MB of text, ~1 s to write): an LSTM's logits for 64 x 4096
    # ids are 18M values; past this the answer is a 400 asking for that output binary (4 bytes a value).
    max_json_values: int = 2**20
    max_batch: int = 64                 # images per request and per onnxruntime call
    max_length: int = 5000              # generated characters (~1 s of one core for the LSTM)
    max_prompt: int = 2000              # prompt characters
    max_seq: int = 4096                 # a text tensor's sequence axis in /v2 infer (a GPT: its block_size)
    # Pixels of one uploaded image, read from its header before decoding: 16 MP passes a 12-MP phone
    # photo (4000 x 3000) and refuses decompression bombs (a 41 KB PNG can declare 12000 x 12000).
    # The model sees 32 x 32; nothing near Pillow's own 89 MP guard (which only warns up to 179 MP).
    max_pixels: int = 16_000_000
    # Images decoded at once (a thread each, one per core): the memory ceiling of decoding is about
    # max_decodes x 8 bytes x max_pixels (RGBA + RGB copies), ~260 MB with these defaults.
    max_decodes: int = 2
    body_timeout_s: float = 30.0        # the whole body must arrive in this time (408): 16 MiB needs ~4.5 Mbit/s
    max_header_bytes: int = 64 * 2**10  # request line + header fields (431): browsers send < 8 KiB
    max_headers: int = 100              # header fields (431): Apache's LimitRequestFields default


@dataclass(frozen=True)
class LogOptions:
    """`ptpipe serve --log PATH ...`: the prediction log (ptpipe.predlog), each default with its reason."""

    path: str                           # the SQLite file (created with its tables if absent)
    sample: float = 1.0                 # fraction of requests logged, drawn per request (all its images or none)
    retention_s: float = 7 * 86400      # rows older than this are deleted: a week covers a weekly monitor's window
    max_rows: int = 1_000_000           # and at most this many rows (~180 B each for 10 classes, no raw: ~180 MB)
    raw_per_hour: int = 0               # raw inputs kept per model per clock hour, the first ones (0: none, private)
    commit_s: float = 0.5               # the writer commits this often: a crash loses at most ~this much
