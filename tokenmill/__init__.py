"""tokenmill: a PyTorch inference engine with an OpenAI-compatible server."""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tokenmill.entrypoints.llm import LLM
    from tokenmill.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported lazily so `import tokenmill` (e.g. by the CLI's --help) does not pay for torch.
    if name == "LLM":
        from tokenmill.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tokenmill.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
