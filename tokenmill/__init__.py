"""tokenmill: a PyTorch inference engine with an OpenAI-compatible server."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tokenmill.engine.outputs import CompletionOutput, RequestOutput
    from tokenmill.entrypoints.llm import LLM
    from tokenmill.sampling_params import SamplingParams

# Imported lazily so `import tokenmill` (e.g. by the CLI's --help) does not pay for torch.
_LAZY = {
    "LLM": "tokenmill.entrypoints.llm",
    "SamplingParams": "tokenmill.sampling_params",
    "RequestOutput": "tokenmill.engine.outputs",
    "CompletionOutput": "tokenmill.engine.outputs",
}
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
