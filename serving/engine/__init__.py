"""The expert pool's engine: batched mixed-adapter decoding over one base model.

Read top to bottom:
- `requests`: what the engine takes and gives (`GenerationRequest`, `SamplingParams`, `Delta`).
- `layout`: the one table of a Llama layer's linears (which read one input, in which order).
- `prepare`: every in-place rewrite of the pool's model for serving (dtype, packing, gemv, the
  decoder's fused weights, the LoRA stack of `lora`).
- `decoder`: the decode batch, a lean Llama forward with the stacked LoRA (`FastBatch`) or the
  HF model through peft (`HFBatch`); `packed`: base weights in a CPU kernel's layout.
- `sampling`: the next token and incremental detokenisation; `batch`: one batch decoding
  (`Decoding`), a step at a time.
- `scheduler`: the one batching loop (iteration-level: a batch that arrives joins the running ones).
- `protocol`: the `Engine` the pool deployment drives, and `make_engine`; its two implementations,
  `process` (`EngineProcess`, a child process: `serve.pool.engine: process`) and `thread`
  (`ThreadEngine`, a thread of the replica), share `streams` (the replica's side of a batch).
"""

from serving.engine.batch import (
    Decoding,
    check_request,
    decode,
    generate,
    load_adapters,
    loaded_versions,
    open_batch,
    results,
)
from serving.engine.prepare import load_pool, pool_info, serving_weights, use_gemv
from serving.engine.protocol import Engine, EngineError, make_engine
from serving.engine.requests import (
    Delta,
    GenerationRequest,
    SamplingParams,
    adapter_version,
    coalesce,
    paced,
)
from serving.engine.sampling import Text

__all__ = [
    "Decoding",
    "Delta",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "SamplingParams",
    "Text",
    "adapter_version",
    "check_request",
    "coalesce",
    "decode",
    "generate",
    "load_adapters",
    "load_pool",
    "loaded_versions",
    "make_engine",
    "open_batch",
    "paced",
    "pool_info",
    "results",
    "serving_weights",
    "use_gemv",
]
