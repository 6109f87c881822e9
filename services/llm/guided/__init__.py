"""Grammar-constrained decoding: a request's output format becomes a token mask the sampler applies.

`GuidedDecoding` (spec.py) says what a request's output must match; `GrammarCompiler` (compiler.py) turns it into
an xgrammar grammar over the model's tokenizer; `GuidedDecoder` (decoder.py) keeps one matcher per sequence and
fills the next-token bitmasks on a worker thread while the model runs the step.
"""

from services.llm.guided.compiler import GrammarCompiler, GrammarError
from services.llm.guided.decoder import GrammarState, GuidedDecoder, MaskJob
from services.llm.guided.spec import GuidedDecoding

__all__ = ["GrammarCompiler", "GrammarError", "GrammarState", "GuidedDecoder", "GuidedDecoding", "MaskJob"]
